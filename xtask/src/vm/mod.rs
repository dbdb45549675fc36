//! Everything that boots a guest: QEMU itself (`qemu`), the default tier's
//! smoke (`smoke`, with the ESP states of `esp_states`), the VM tier's
//! end-to-end story (`e2e`, which also holds the ssh client every harness
//! uses, and the `toolbox` checks it runs), the cluster (`cluster`) and the
//! VM tier's runner (`vmtest`).

pub mod cluster;
pub mod e2e;
pub mod esp_states;
pub mod qemu;
pub mod smoke;
pub mod toolbox;
pub mod vmtest;
