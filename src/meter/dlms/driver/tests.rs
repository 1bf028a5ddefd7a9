//! Tests of the DLMS driver.

use super::*;
use crate::meter::link::TcpConfig;

fn tcp() -> Link {
    Link::Tcp(TcpConfig {
        host: "127.0.0.1".into(),
        port: 4059,
        concurrency: 1,
    })
}

fn resolve(section: &str, dir: &Path) -> Result<DlmsMeter, Vec<String>> {
    let c: DlmsMeterConfig = toml::from_str(section).map_err(|e| vec![e.to_string()])?;
    let tz = TimeZone::UTC;
    let cx = Context {
        meter: "m1",
        gateway_id: "gw-1",
        data_dir: dir,
        gateway_tz: &tz,
    };
    let mut p = Problems::default();
    c.resolve("meter[0].dlms", &tcp(), &cx, &mut p)
        .ok_or_else(|| {
            p.0.iter()
                .map(|x| format!("{}: {}", x.key, x.message))
                .collect()
        })
}

#[test]
fn hls_without_key_files_should_name_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let e = resolve("security = \"hls-gmac\"", dir.path()).unwrap_err();
    assert!(
        e.iter()
            .any(|m| m.starts_with("meter[0].dlms.block_key_file")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("meter[0].dlms.auth_key_file")),
        "{e:?}"
    );
}

#[test]
fn short_key_should_be_an_error_without_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let ek = dir.path().join("ek");
    let ak = dir.path().join("ak");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E\n").unwrap();
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\n").unwrap();
    let e = resolve(
        &format!(
            "security = \"hls-gmac\"\nblock_key_file = {:?}\nauth_key_file = {:?}",
            ek, ak
        ),
        dir.path(),
    )
    .unwrap_err();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("meter[0].dlms.block_key_file"));
    assert!(!e[0].contains("0A0B"), "the key leaked: {}", e[0]);
}

#[test]
fn good_keys_should_resolve_and_never_print() {
    let dir = tempfile::tempdir().unwrap();
    let ek = dir.path().join("ek");
    let ak = dir.path().join("ak");
    std::fs::write(&ek, "000102030405060708090A0B0C0D0E0F\n").unwrap();
    std::fs::write(&ak, "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF").unwrap();
    let m = resolve(
        &format!(
            "client = 1\nsecurity = \"hls-gmac\"\nblock_key_file = {:?}\nauth_key_file = {:?}",
            ek, ak
        ),
        dir.path(),
    )
    .unwrap();
    assert_eq!(m.transport, Transport::Wrapper);
    let shown = format!("{m:?}");
    assert!(!shown.contains("0, 1, 2, 3"), "{shown}");
    match m.security {
        SecurityConfig::HlsGmac {
            keys,
            client_system_title,
        } => {
            assert_eq!(keys.encryption[15], 0x0F);
            assert_eq!(client_system_title, default_system_title("gw-1"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn lls_without_password_and_mode_e_on_tcp_should_be_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = resolve("security = \"lls\"\nmode_e = true", dir.path()).unwrap_err();
    assert!(
        e.iter()
            .any(|m| m.starts_with("meter[0].dlms.password_file")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.starts_with("meter[0].dlms.mode_e")),
        "{e:?}"
    );
}

#[test]
fn unknown_key_should_be_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(resolve("sekurity = \"none\"", dir.path()).is_err());
}
