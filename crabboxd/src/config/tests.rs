//! Tests of layering order, strict parsing and YAML compatibility.

use std::fs;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    dirs: Dirs,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dirs = Dirs {
            config: dir.path().join("config"),
            state: dir.path().join("state"),
        };
        fs::create_dir_all(dirs.config.join("crabbox")).unwrap();
        Fixture { _dir: dir, dirs }
    }

    fn toml(&self, text: &str) -> PathBuf {
        let p = self.dirs.config.join("crabbox/crabboxd.toml");
        fs::write(&p, text).unwrap();
        p
    }

    fn yaml(&self, text: &str) -> PathBuf {
        let p = self.dirs.config.join("crabbox/config.yaml");
        fs::write(&p, text).unwrap();
        p
    }

    fn load(&self, env: &MapEnv, o: &Overrides) -> Result<Config, ConfigError> {
        Config::load_from(o, env, &self.dirs)
    }
}

fn url_of(c: &Config) -> String {
    c.coordinator.as_ref().unwrap().url.to_string()
}

#[test]
fn defaults_with_no_files() {
    let f = Fixture::new();
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    assert!(c.coordinator.is_none());
    assert_eq!(c.log_filter, "info");
    assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(c.state_dir, f.dirs.state.join("crabbox"));
    assert_eq!(c.files.len(), 2);
    assert!(c.files.iter().all(|s| s.mode.is_none()));
}

#[test]
fn layering_order_toml_then_yaml_then_env_then_flags() {
    let f = Fixture::new();
    f.toml("[coordinator]\nurl = \"https://toml.example\"\nowner = \"t@example\"\n[daemon]\nlog = \"warn\"\n");
    // TOML alone.
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    assert_eq!(url_of(&c), "https://toml.example/");
    assert_eq!(c.log_filter, "warn");

    // YAML beats TOML.
    f.yaml("broker:\n  url: https://yaml.example/\n  token: yaml-token\n");
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    assert_eq!(url_of(&c), "https://yaml.example/");
    let coord = c.coordinator.as_ref().unwrap();
    assert!(
        matches!(&coord.token, Some(TokenSource::Literal { token, .. }) if token.expose() == "yaml-token")
    );
    assert_eq!(coord.owner.as_deref(), Some("t@example"));

    // Environment beats YAML.
    let env = MapEnv::from_pairs([
        ("CRABBOX_COORDINATOR", "http://env.example:8080"),
        ("CRABBOX_COORDINATOR_TOKEN", "env-token"),
        ("CRABBOX_OWNER", "e@example"),
        ("CRABBOX_LOG", "debug"),
    ]);
    let c = f.load(&env, &Overrides::default()).unwrap();
    assert_eq!(url_of(&c), "http://env.example:8080/");
    let coord = c.coordinator.as_ref().unwrap();
    assert!(
        matches!(&coord.token, Some(TokenSource::Literal { token, origin }) if token.expose() == "env-token" && origin == "CRABBOX_COORDINATOR_TOKEN")
    );
    assert_eq!(coord.owner.as_deref(), Some("e@example"));
    assert_eq!(c.log_filter, "debug");

    // Flags beat everything.
    let o = Overrides {
        coordinator: Some("https://flag.example".into()),
        log: Some("trace".into()),
        socket: Some("/x/flag.sock".into()),
        ..Default::default()
    };
    let c = f.load(&env, &o).unwrap();
    assert_eq!(url_of(&c), "https://flag.example/");
    assert_eq!(c.log_filter, "trace");
    assert_eq!(c.socket.as_deref(), Some(Path::new("/x/flag.sock")));
}

#[test]
fn unknown_toml_key_names_key_and_file() {
    let f = Fixture::new();
    let p = f.toml("[coordinator]\nurl = \"https://a.example\"\ntokn = \"oops\"\n");
    let err = f
        .load(&MapEnv::default(), &Overrides::default())
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("tokn"), "{msg}");
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
    // The secret-looking value is not echoed back.
    assert!(!msg.contains("oops"), "{msg}");
}

#[test]
fn unknown_toml_section_is_an_error() {
    let f = Fixture::new();
    f.toml("[coordinatr]\nurl = \"https://a.example\"\n");
    let msg = f
        .load(&MapEnv::default(), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("coordinatr"), "{msg}");
}

#[test]
fn reference_yaml_with_foreign_keys_is_accepted() {
    let f = Fixture::new();
    f.yaml(
        "provider: hetzner\nbroker:\n  url: https://crabbox.example.com/\n  token: abc\n  mode: remote\n\
         ssh:\n  user: crabbox\negress:\n  profiles:\n    docs: [\"docs.example.com\", \"*.cdn.example.com\"]\n",
    );
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    assert_eq!(url_of(&c), "https://crabbox.example.com/");
    assert_eq!(
        c.egress_profiles.get("docs").unwrap(),
        &vec![
            "docs.example.com".to_owned(),
            "*.cdn.example.com".to_owned()
        ]
    );
    assert!(
        c.files
            .iter()
            .any(|s| s.kind == SourceKind::CrabboxYaml && s.mode.is_some())
    );
}

#[test]
fn crabbox_config_env_names_the_only_yaml() {
    let f = Fixture::new();
    f.yaml("broker:\n  url: https://default.example\n");
    let other = f.dirs.config.join("other.yaml");
    fs::write(&other, "broker:\n  url: https://other.example\n").unwrap();
    let env = MapEnv::from_pairs([("CRABBOX_CONFIG", other.to_str().unwrap())]);
    let c = f.load(&env, &Overrides::default()).unwrap();
    assert_eq!(url_of(&c), "https://other.example/");
    // A named file that does not exist is an error, not silently skipped.
    let env = MapEnv::from_pairs([("CRABBOX_CONFIG", "/nonexistent/crabbox.yaml")]);
    let msg = f.load(&env, &Overrides::default()).unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/crabbox.yaml"), "{msg}");
}

#[test]
fn token_command_is_a_json_argv() {
    let f = Fixture::new();
    let env = MapEnv::from_pairs([
        ("CRABBOX_COORDINATOR", "https://a.example"),
        ("CRABBOX_COORDINATOR_TOKEN", "literal"),
        (
            "CRABBOX_COORDINATOR_TOKEN_COMMAND",
            r#"["pass","show","crabbox"]"#,
        ),
    ]);
    let c = f.load(&env, &Overrides::default()).unwrap();
    assert!(matches!(
        &c.coordinator.unwrap().token,
        Some(TokenSource::Command { argv, .. }) if argv == &["pass", "show", "crabbox"]
    ));
    let env = MapEnv::from_pairs([
        ("CRABBOX_COORDINATOR", "https://a.example"),
        ("CRABBOX_COORDINATOR_TOKEN_COMMAND", "pass show crabbox"),
    ]);
    let msg = f.load(&env, &Overrides::default()).unwrap_err().to_string();
    assert!(msg.contains("CRABBOX_COORDINATOR_TOKEN_COMMAND"), "{msg}");
}

#[test]
fn bad_values_are_refused_with_their_origin() {
    let f = Fixture::new();
    for (url, want) in [
        ("ftp://a.example", "scheme"),
        ("https://user:pw@a.example", "credentials"),
        ("not a url", "want e.g."),
    ] {
        let env = MapEnv::from_pairs([("CRABBOX_COORDINATOR", url)]);
        let msg = f.load(&env, &Overrides::default()).unwrap_err().to_string();
        assert!(
            msg.contains(want) && msg.contains("CRABBOX_COORDINATOR"),
            "{msg}"
        );
        assert!(!msg.contains("pw@"), "{msg}");
    }
    let env = MapEnv::from_pairs([("CRABBOX_LOG", "info,=[")]);
    assert!(f.load(&env, &Overrides::default()).is_err());
    f.toml("[egress.profiles]\nopen = [\"*\"]\n");
    let msg = f
        .load(&MapEnv::default(), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("open"), "{msg}");
}

#[test]
fn tokens_never_show_in_debug() {
    let f = Fixture::new();
    let env = MapEnv::from_pairs([
        ("CRABBOX_COORDINATOR", "https://a.example"),
        ("CRABBOX_COORDINATOR_TOKEN", "cbxu_super_secret"),
    ]);
    let c = f.load(&env, &Overrides::default()).unwrap();
    assert!(!format!("{c:?}").contains("cbxu_super_secret"));
}

#[test]
fn example_file_parses() {
    let t: DaemonToml = toml::from_str(EXAMPLE_TOML).unwrap();
    assert!(t.coordinator.url.is_none());
}

#[test]
fn heartbeat_transport_from_toml_then_env_and_bad_values_are_named() {
    let f = Fixture::new();
    f.toml("[coordinator]\nurl = \"https://c.example\"\nheartbeat_transport = \"http\"\ncontrol_ping_interval = \"2s\"\n");
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    let coord = c.coordinator.as_ref().unwrap();
    assert_eq!(coord.heartbeat_transport, HeartbeatTransport::Http);
    assert_eq!(coord.control_ping_interval, Duration::from_secs(2));
    let env = MapEnv::from_pairs([("CRABBOX_HEARTBEAT_TRANSPORT", "control")]);
    let c = f.load(&env, &Overrides::default()).unwrap();
    assert_eq!(
        c.coordinator.unwrap().heartbeat_transport,
        HeartbeatTransport::Control
    );
    let env = MapEnv::from_pairs([("CRABBOX_HEARTBEAT_TRANSPORT", "websocket")]);
    let e = f.load(&env, &Overrides::default()).unwrap_err().to_string();
    assert!(
        e.contains("heartbeat_transport") && e.contains("CRABBOX_HEARTBEAT_TRANSPORT"),
        "{e}"
    );
    // The default is auto, with a 15 s ping.
    f.toml("[coordinator]\nurl = \"https://c.example\"\n");
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    let coord = c.coordinator.unwrap();
    assert_eq!(coord.heartbeat_transport, HeartbeatTransport::Auto);
    assert_eq!(coord.control_ping_interval, DEFAULT_CONTROL_PING_INTERVAL);
}

#[test]
fn env_allow_from_toml_then_yaml_and_the_daemon_env_is_not_read_for_it() {
    let f = Fixture::new();
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    assert_eq!(c.env_allow, None);
    f.toml("[env]\nallow = [\"CI\", \"NPM_*\"]\n");
    let c = f.load(&MapEnv::default(), &Overrides::default()).unwrap();
    assert_eq!(
        c.env_allow.as_deref(),
        Some(&["CI".to_owned(), "NPM_*".to_owned()][..])
    );
    f.yaml("env:\n  allow: [FOO]\n");
    // CRABBOX_ENV_ALLOW is the client's: the daemon's own is ignored.
    let env = MapEnv::from_pairs([("CRABBOX_ENV_ALLOW", "BAR")]);
    let c = f.load(&env, &Overrides::default()).unwrap();
    assert_eq!(c.env_allow.as_deref(), Some(&["FOO".to_owned()][..]));
}
