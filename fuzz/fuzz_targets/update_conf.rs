//! update.conf as an operator (or cloud-config) writes it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(mut c) = nimbus::updateconf::UpdateConf::parse(text) {
        let _ = nimbus_updater::config::EngineConfig::from_conf(&c);
        let _ = nimbus_etcd::options_from_conf(&c);
        c.set("GROUP", "beta");
        let again = nimbus::updateconf::UpdateConf::parse(&c.render()).expect("rendered conf parses");
        assert_eq!(again.get("GROUP"), Some("beta"));
    }
    for l in text.lines().take(4) {
        let _ = nimbus::updateconf::parse_duration(l);
        let _ = nimbus::updateconf::check_window_start(l);
        let _ = nimbus_updater::policy::Window::parse(l, "1h");
    }
});
