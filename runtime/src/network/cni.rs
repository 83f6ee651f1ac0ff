//! CNI (spec 1.0): network configuration loading and plugin execution.
//!
//! Written here rather than taken from a crate: no maintained Rust CNI
//! library exists, and the runtime side of the spec is small: pick the
//! first valid configuration file, run each plugin binary with the `CNI_*`
//! environment and the configuration on stdin, chain results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use super::NetworkError;

/// A network configuration list, as loaded from the configuration directory
/// (a single-plugin `.conf` becomes a list of one). Stored with the pod, so
/// DEL runs what ADD ran even if the directory changed since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfList {
    /// The file it came from.
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    /// Each plugin's configuration object, as written (with `type`).
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkConfList {
    /// Parses a `.conflist` (`plugins` array) or a `.conf`/`.json` (one plugin).
    pub fn parse(file: &Path, text: &str) -> Result<Self, String> {
        let value: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
        let string = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
        let name = string("name").filter(|n| !n.is_empty()).ok_or("no name")?;
        let cni_version = string("cniVersion").unwrap_or_else(|| "0.1.0".into());
        let is_list = file.extension().is_some_and(|e| e == "conflist");
        let plugins = if is_list {
            let list = value
                .get("plugins")
                .and_then(Value::as_array)
                .ok_or("no plugins array")?;
            list.iter()
                .map(|p| p.as_object().cloned().ok_or("a plugin is not an object"))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![value.clone()]
        };
        if plugins.is_empty() {
            return Err("empty plugins array".into());
        }
        for plugin in &plugins {
            match plugin.get("type").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && !t.contains('/') => {}
                _ => return Err("a plugin has no valid type".into()),
            }
        }
        Ok(Self {
            file: file.to_owned(),
            name,
            cni_version,
            disable_check: value
                .get("disableCheck")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            plugins,
        })
    }

    /// The plugins' types (binary names), in order.
    pub fn plugin_types(&self) -> impl Iterator<Item = &str> {
        self.plugins
            .iter()
            .filter_map(|p| p.get("type").and_then(Value::as_str))
    }
}

/// Loads the first usable configuration in `dir` (lexical order of the
/// `.conflist`, `.conf` and `.json` files, as libcni does): one that parses
/// and whose plugins all exist in `bin_dirs`. The error says why none is.
pub fn load(dir: &Path, bin_dirs: &[PathBuf]) -> Result<NetworkConfList, NetworkError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        NetworkError::NoConfig(format!(
            "cannot read CNI config directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    let mut problems = Vec::new();
    for file in files {
        let parsed = std::fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|text| NetworkConfList::parse(&file, &text))
            .and_then(|conf| {
                let missing = conf
                    .plugin_types()
                    .find(|t| find_plugin(t, bin_dirs).is_none())
                    .map(str::to_owned);
                match missing {
                    Some(missing) => Err(format!("plugin {missing} not found")),
                    None => Ok(conf),
                }
            });
        match parsed {
            Ok(conf) => return Ok(conf),
            Err(e) => problems.push(format!("{}: {e}", file.display())),
        }
    }
    Err(NetworkError::NoConfig(if problems.is_empty() {
        format!("no CNI network config found in {}", dir.display())
    } else {
        format!("no usable CNI network config: {}", problems.join("; "))
    }))
}

/// The plugin binary `name` in the first of `bin_dirs` that has it.
pub fn find_plugin(name: &str, bin_dirs: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    bin_dirs.iter().map(|d| d.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

/// Who the network is for: the `CNI_*` variables and capability arguments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    /// Path of the pod's network namespace; empty if it is gone (DEL only).
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` pairs (K8S_POD_NAME, ...).
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `dns`, ...), given to the
    /// plugins that declare the capability, under `runtimeConfig`.
    pub capability_args: BTreeMap<String, Value>,
}

/// A plugin's result (spec 1.0 fields the runtime uses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Netns path for interfaces inside the pod; empty for host ones.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR: the address with its prefix length.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// Runs the list's plugins for `command`: ADD in order, chaining each
/// result into the next plugin's `prevResult`; CHECK in order and DEL in
/// reverse, both with `prev` (the stored ADD result) as `prevResult`.
/// Returns the last ADD result (unchanged `prev` for DEL and CHECK).
pub async fn run(
    conf: &NetworkConfList,
    bin_dirs: &[PathBuf],
    command: Command,
    att: &Attachment,
    prev: Option<&Value>,
) -> Result<Option<Value>, NetworkError> {
    let mut prev = prev.cloned();
    let order: Vec<&Map<String, Value>> = match command {
        Command::Del => conf.plugins.iter().rev().collect(),
        Command::Add | Command::Check => conf.plugins.iter().collect(),
    };
    for plugin in order {
        let stdin = plugin_config(conf, plugin, att, prev.as_ref());
        let out = exec(plugin, bin_dirs, command, att, &stdin).await?;
        if command == Command::Add {
            prev = Some(out);
        }
    }
    Ok(prev)
}

/// The stdin of one plugin: its object plus `name`, `cniVersion`,
/// `prevResult` and the capability arguments it declares.
fn plugin_config(
    conf: &NetworkConfList,
    plugin: &Map<String, Value>,
    att: &Attachment,
    prev: Option<&Value>,
) -> Value {
    let mut obj = plugin.clone();
    obj.insert("name".into(), conf.name.clone().into());
    obj.insert("cniVersion".into(), conf.cni_version.clone().into());
    if let Some(prev) = prev {
        obj.insert("prevResult".into(), prev.clone());
    }
    let caps = plugin.get("capabilities").and_then(Value::as_object);
    let runtime: Map<String, Value> = att
        .capability_args
        .iter()
        .filter(|(k, _)| caps.is_some_and(|c| c.get(*k) == Some(&Value::Bool(true))))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !runtime.is_empty() {
        obj.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    Value::Object(obj)
}

async fn exec(
    plugin: &Map<String, Value>,
    bin_dirs: &[PathBuf],
    command: Command,
    att: &Attachment,
    stdin: &Value,
) -> Result<Value, NetworkError> {
    let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
    let binary = find_plugin(kind, bin_dirs).ok_or_else(|| NetworkError::Plugin {
        plugin: kind.to_owned(),
        command: command.as_str(),
        message: "binary not found in the CNI bin dirs".into(),
    })?;
    let cni_path = std::env::join_paths(bin_dirs).unwrap_or_default();
    let cni_args = att
        .args
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";");
    let mut child = tokio::process::Command::new(&binary)
        .env_clear()
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &att.container_id)
        .env("CNI_NETNS", &att.netns)
        .env("CNI_IFNAME", &att.ifname)
        .env("CNI_ARGS", cni_args)
        .env("CNI_PATH", cni_path)
        // Plugins such as portmap run iptables, found through PATH.
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NetworkError::Plugin {
            plugin: kind.to_owned(),
            command: command.as_str(),
            message: format!("cannot run {}: {e}", binary.display()),
        })?;
    let bytes = serde_json::to_vec(stdin).unwrap_or_default();
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin that exits without reading its stdin is judged by its
        // exit status below, not by this write.
        let _ = pipe.write_all(&bytes).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetworkError::Plugin {
            plugin: kind.to_owned(),
            command: command.as_str(),
            message: format!("waiting for it: {e}"),
        })?;
    if !out.status.success() {
        // Spec: a failing plugin prints {code, msg, details} on stdout.
        let err: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let msg = err.get("msg").and_then(Value::as_str).unwrap_or("");
        let details = err.get("details").and_then(Value::as_str).unwrap_or("");
        let mut message = format!("{}: {msg}", out.status);
        if !details.is_empty() {
            message.push_str(&format!(" ({details})"));
        }
        if msg.is_empty() {
            message.push_str(String::from_utf8_lossy(&out.stderr).trim());
        }
        return Err(NetworkError::Plugin {
            plugin: kind.to_owned(),
            command: command.as_str(),
            message,
        });
    }
    if command != Command::Add {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| NetworkError::Plugin {
        plugin: kind.to_owned(),
        command: command.as_str(),
        message: format!("invalid result: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFLIST: &str = r#"{
        "cniVersion": "1.0.0", "name": "podnet",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }"#;

    #[test]
    fn conflist_and_conf_parse() {
        let l = NetworkConfList::parse(Path::new("/x/10-a.conflist"), CONFLIST).unwrap();
        assert_eq!(l.name, "podnet");
        assert_eq!(l.plugin_types().collect::<Vec<_>>(), ["bridge", "portmap"]);
        let c = NetworkConfList::parse(
            Path::new("/x/10-a.conf"),
            r#"{"cniVersion":"0.4.0","name":"n","type":"bridge"}"#,
        )
        .unwrap();
        assert_eq!(c.plugins.len(), 1);
        for bad in [
            "[]",
            r#"{"name":"n"}"#,
            r#"{"name":"n","plugins":[]}"#,
            r#"{"name":"n","plugins":[{"type":"../x"}]}"#,
            r#"{"plugins":[{"type":"x"}]}"#,
        ] {
            assert!(
                NetworkConfList::parse(Path::new("/x/a.conflist"), bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn first_usable_file_in_lexical_order_wins() {
        let dir = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let bins = vec![bin.path().to_owned()];
        assert!(matches!(
            load(dir.path(), &bins),
            Err(NetworkError::NoConfig(_))
        ));
        for name in ["bridge", "portmap"] {
            use std::os::unix::fs::PermissionsExt;
            let p = bin.path().join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        std::fs::write(
            dir.path().join("07-missing.conf"),
            r#"{"name":"m","type":"flannel"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("10-good.conflist"), CONFLIST).unwrap();
        std::fs::write(
            dir.path().join("20-other.conf"),
            r#"{"name":"o","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("00-ignored.txt"), CONFLIST).unwrap();
        let conf = load(dir.path(), &bins).unwrap();
        assert_eq!(conf.name, "podnet");
        std::fs::remove_file(dir.path().join("10-good.conflist")).unwrap();
        std::fs::remove_file(dir.path().join("20-other.conf")).unwrap();
        let err = load(dir.path(), &bins).unwrap_err().to_string();
        assert!(
            err.contains("05-broken") && err.contains("flannel"),
            "{err}"
        );
    }

    #[test]
    fn capability_args_reach_only_declaring_plugins() {
        let l = NetworkConfList::parse(Path::new("/x/a.conflist"), CONFLIST).unwrap();
        let att = Attachment {
            capability_args: [(
                "portMappings".to_owned(),
                serde_json::json!([{"hostPort": 80}]),
            )]
            .into(),
            ..Default::default()
        };
        let prev = serde_json::json!({"cniVersion": "1.0.0"});
        let bridge = plugin_config(&l, &l.plugins[0], &att, None);
        assert!(bridge.get("runtimeConfig").is_none());
        assert_eq!(bridge["name"], "podnet");
        let portmap = plugin_config(&l, &l.plugins[1], &att, Some(&prev));
        assert_eq!(portmap["runtimeConfig"]["portMappings"][0]["hostPort"], 80);
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(portmap["cniVersion"], "1.0.0");
    }

    #[test]
    fn results_parse() {
        let r: CniResult = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0","mac":"aa:bb:cc:dd:ee:01"},
                              {"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/run/ns"}],
                "ips":[{"address":"10.88.0.2/16","gateway":"10.88.0.1","interface":1}],
                "routes":[{"dst":"0.0.0.0/0"}],
                "dns":{}}"#,
        )
        .unwrap();
        assert_eq!(r.ips[0].interface, Some(1));
        assert_eq!(r.interfaces[1].sandbox, "/run/ns");
        assert_eq!(r.routes[0].gw, None);
    }
}
