//! See tests/*.rs: end-to-end tests that cross crates.
