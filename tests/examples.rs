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
    assert_eq!(
        pagings.len(),
        6,
        "none, page, offset, cursor, next_url and link_header: {pagings:?}"
    );
}

#[test]
fn the_demo_import_config_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo");
    let (valid, errors) = sluice_jobs::configs::validate_dir(&dir, &env).unwrap();
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(valid.len(), 1);
    assert_eq!(valid[0].file.transforms, vec!["redact-pii".to_string()]);
}

#[test]
fn the_example_sluice_toml_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sluice.toml");
    let config = sluice_core::config::load(Some(&path), &env).unwrap();
    assert_eq!(config.tracking.session_timeout_minutes, 30);
    assert_eq!(config.write_keys.len(), 1);
}

/// Every ```toml block of the README and the docs is a config Sluice reads: a
/// `sluice.toml`, an integration config or a plugin manifest.
#[test]
fn every_toml_example_in_the_docs_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        files.push(entry.unwrap().path());
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, block) in text.split("```toml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap();
            // Placeholders in the docs stand for values the reader fills in.
            let block = block.replace("\"…\"", "\"0\"");
            let as_config = sluice_core::config::parse("doc", &block)
                .map_err(|e| e.to_string())
                .and_then(|raw| {
                    sluice_core::config::validate("doc", &Default::default(), raw, &env)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            let as_integration = sluice_core::integration::parse_file("doc", &block)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    sluice_core::integration::validate("doc", &f, &env)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            let as_manifest = toml::from_str::<sluice_plugins::Manifest>(&block)
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert!(
                as_config.is_ok() || as_integration.is_ok() || as_manifest.is_ok(),
                "{} block {}:\n{block}\nas sluice.toml: {:?}\nas integration: {:?}\nas manifest: {:?}",
                file.display(),
                i + 1,
                as_config.err(),
                as_integration.err(),
                as_manifest.err()
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} blocks found");
}
