//! Every example in `examples/` parses and validates, so the docs cannot drift from the
//! code.

use std::path::Path;

fn env(name: &str) -> Option<String> {
    // Every secret reference of the examples resolves to a placeholder; the
    // SLUICE_* overrides are left unset so the files themselves are checked.
    let is_override = sluice_core::config::ENV_OVERRIDES
        .iter()
        .any(|(v, _)| *v == name);
    (!is_override).then(|| "example-secret-value".to_string())
}

#[test]
fn every_example_integration_config_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/integrations");
    let (valid, errors) = sluice_jobs::configs::validate_dir(&dir, &env).unwrap();
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(
        valid.len() >= 5,
        "one example per auth type and pagination style"
    );
    let auths: std::collections::BTreeSet<String> = valid
        .iter()
        .map(|v| v.connector.auth.auth_type().to_string())
        .collect();
    assert_eq!(auths.len(), 4, "NONE, API_KEY, BASIC and OAUTH: {auths:?}");
    let pagings: std::collections::BTreeSet<String> = valid
        .iter()
        .map(|v| {
            format!("{:?}", v.connector.paging)
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(pagings.len() >= 4, "{pagings:?}");
}

#[test]
fn the_example_sluice_toml_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sluice.toml");
    let config = sluice_core::config::load(Some(&path), &env).unwrap();
    assert_eq!(config.tracking.session_timeout_minutes, 30);
    assert_eq!(config.write_keys.len(), 1);
}
