//! `#cloud-config` user-data: YAML parsing and the schema check.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = nimbus_cloud_config::yaml::parse(text);
    let _ = nimbus_cloud_config::schema::check(text);
});
