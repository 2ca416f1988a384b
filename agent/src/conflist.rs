//! Chaining `divert-cni` into the node's primary CNI network configuration,
//! as istio-cni's `install-cni` does: the plugin binary copied into the CNI
//! bin directory, and divert's entry appended to the `plugins` of the
//! primary configuration (the first `.conflist`, `.conf` or `.json` of the
//! configuration directory in name order, which is the one container
//! runtimes use). A `.conf` (one plugin, no list) becomes a `.conflist`
//! with the same name, holding it and divert's entry.
//!
//! The primary's own bytes are kept: divert's entry is spliced in as text
//! before the closing `]` of `plugins`, and the file as it was is saved
//! beside it (`<file>.divert-orig`, an extension no runtime reads), so
//! [`uninstall`] gives it back byte for byte. When the primary plugin
//! rewrites its file (dropping divert's entry), [`install`] run again
//! saves the new file and splices the entry in again: it is idempotent and
//! is also the repair.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// The plugin's name in the bin directory and its `type`.
pub const PLUGIN: &str = "divert-cni";
/// Suffix of the saved original beside the primary configuration.
pub const ORIGINAL_SUFFIX: &str = ".divert-orig";
/// The largest configuration file read.
const MAX_CONF_BYTES: u64 = 1 << 20;

/// Whether `v` is divert's plugin entry.
fn is_ours(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// The byte offset of the `]` that closes the top-level `plugins` array of
/// the JSON object `text`, and whether the array has elements. `text` must
/// be valid JSON (checked by the caller).
fn plugins_end(text: &str) -> Option<(usize, bool)> {
    let b = text.as_bytes();
    let (mut i, mut depth) = (0usize, 0i32);
    let mut key: Option<(usize, usize)> = None;
    let mut in_plugins: Option<i32> = None;
    let mut has_elements = false;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                key = Some((start, i));
                if in_plugins == Some(depth) {
                    has_elements = true;
                }
            }
            b'{' | b'[' => {
                if in_plugins == Some(depth) {
                    has_elements = true;
                }
                depth += 1;
                if b[i] == b'[' && depth == 2 && in_plugins.is_none() {
                    if let Some((s, e)) = key {
                        if &text[s..e] == "plugins" {
                            in_plugins = Some(depth);
                        }
                    }
                }
            }
            b'}' | b']' => {
                if b[i] == b']' && in_plugins == Some(depth) {
                    return Some((i, has_elements));
                }
                depth -= 1;
            }
            c if !c.is_ascii_whitespace()
                && c != b','
                && c != b':'
                && in_plugins == Some(depth) =>
            {
                has_elements = true;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// `conflist` (the text of a `.conflist`) with `entry` appended to its
/// `plugins`, the rest of its bytes unchanged; with an earlier entry of
/// divert's in it, that is replaced instead (through [`without_ours`]).
pub fn with_entry(conflist: &str, entry: &Value) -> anyhow::Result<String> {
    let v: Value = serde_json::from_str(conflist).context("not JSON")?;
    if v.get("plugins").and_then(Value::as_array).is_none() {
        bail!("no \"plugins\" list");
    }
    let base = if v["plugins"].as_array().unwrap().iter().any(is_ours) {
        without_ours(conflist)?
    } else {
        conflist.to_string()
    };
    let (end, non_empty) = plugins_end(&base).context("no \"plugins\" list")?;
    let entry = serde_json::to_string(entry).expect("an entry serialises");
    let sep = if non_empty { ", " } else { "" };
    Ok(format!("{}{sep}{entry}{}", &base[..end], &base[end..]))
}

/// `conflist` without divert's entries in `plugins`, reserialised.
pub fn without_ours(conflist: &str) -> anyhow::Result<String> {
    let mut v: Value = serde_json::from_str(conflist).context("not JSON")?;
    if let Some(plugins) = v.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| !is_ours(p));
    }
    Ok(serde_json::to_string_pretty(&v).expect("JSON serialises") + "\n")
}

/// Whether `text` holds exactly `entry` among its plugins.
pub fn has_entry(text: &str, entry: &Value) -> bool {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("plugins").and_then(Value::as_array).cloned())
        .is_some_and(|p| p.iter().any(|e| e == entry))
}

/// A single-plugin `.conf` as a `.conflist` holding it (its bytes, as the
/// first plugin) and `entry`.
pub fn conf_to_conflist(conf: &str, entry: &Value) -> anyhow::Result<String> {
    let v: Value = serde_json::from_str(conf).context("not JSON")?;
    let field = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    if v.get("type").is_none() {
        bail!("no plugin \"type\"");
    }
    Ok(format!(
        "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"plugins\": [\n{}, {}\n  ]\n}}\n",
        field("cniVersion"),
        field("name"),
        conf.trim_end(),
        serde_json::to_string(entry).expect("an entry serialises")
    ))
}

/// The primary network configuration of `dir`: the first file by name
/// ending in `.conflist`, `.conf` or `.json` (what runtimes load).
pub fn primary(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

fn read(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut s = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_CONF_BYTES + 1).read_to_string(&mut s))
        .with_context(|| format!("reading {}", path.display()))?;
    if s.len() as u64 > MAX_CONF_BYTES {
        bail!("{} is longer than {MAX_CONF_BYTES} bytes", path.display());
    }
    Ok(s)
}

/// Write `bytes` to `path` atomically (a temporary file in the same
/// directory, then rename), with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().context("a path with a directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn original_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(ORIGINAL_SUFFIX);
    PathBuf::from(s)
}

/// What [`install`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The configuration already held divert's entry: nothing written.
    AlreadyThere(PathBuf),
    /// divert's entry was added to this file (the original saved).
    Chained(PathBuf),
    /// No network configuration yet (the primary CNI is not installed):
    /// nothing to chain into; try again later.
    NoPrimary,
}

/// Copy `binary` into `bin_dir` as [`PLUGIN`] (when it differs) and chain
/// `entry` (divert's plugin configuration, `"type": "divert-cni"`) into the
/// primary configuration of `conf_dir`. Idempotent; run again after the
/// primary rewrote its file, it adds the entry again (and saves the file
/// the primary wrote as the new original).
pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    binary: &Path,
    entry: &Value,
) -> anyhow::Result<Installed> {
    install_plugin(bin_dir, binary)?;
    chain(conf_dir, entry)
}

/// Copy `binary` into `bin_dir` as [`PLUGIN`] when what is there differs.
pub fn install_plugin(bin_dir: &Path, binary: &Path) -> anyhow::Result<()> {
    let target = bin_dir.join(PLUGIN);
    let new = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    if fs::read(&target).ok().as_deref() != Some(&new[..]) {
        write_atomic(&target, &new, 0o755)?;
    }
    Ok(())
}

/// Chain `entry` into the primary configuration of `conf_dir` (the
/// configuration half of [`install`]).
pub fn chain(conf_dir: &Path, entry: &Value) -> anyhow::Result<Installed> {
    if !is_ours(entry) {
        bail!("divert's entry must have \"type\": \"{PLUGIN}\"");
    }
    let Some(path) = primary(conf_dir)? else {
        return Ok(Installed::NoPrimary);
    };
    let text = read(&path)?;
    if has_entry(&text, entry) {
        return Ok(Installed::AlreadyThere(path));
    }
    let what =
        |e: anyhow::Error| e.context(format!("the network configuration {}", path.display()));
    let is_list = serde_json::from_str::<Value>(&text)
        .map_err(|e| what(e.into()))?
        .get("plugins")
        .is_some();
    if is_list {
        // The file as the primary (or an earlier divert) left it, without
        // divert: what uninstall gives back.
        let v: Value = serde_json::from_str(&text)?;
        let holds_ours = v["plugins"]
            .as_array()
            .is_some_and(|p| p.iter().any(is_ours));
        if !holds_ours {
            write_atomic(&original_of(&path), text.as_bytes(), 0o644)?;
        }
        write_atomic(
            &path,
            with_entry(&text, entry).map_err(what)?.as_bytes(),
            0o644,
        )?;
        Ok(Installed::Chained(path))
    } else {
        let list = path.with_extension("conflist");
        write_atomic(&original_of(&path), text.as_bytes(), 0o644)?;
        write_atomic(
            &list,
            conf_to_conflist(&text, entry).map_err(what)?.as_bytes(),
            0o644,
        )?;
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        Ok(Installed::Chained(list))
    }
}

/// Take divert out of `conf_dir` and `bin_dir`: each configuration with a
/// saved original gets it back byte for byte when the file is still what
/// divert wrote (else divert's entry is taken out of what is there), and
/// the plugin binary is removed. Returns the files restored.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut restored = Vec::new();
    for e in fs::read_dir(conf_dir).with_context(|| format!("reading {}", conf_dir.display()))? {
        let saved = e?.path();
        let Some(name) = saved
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(ORIGINAL_SUFFIX))
        else {
            continue;
        };
        let path = conf_dir.join(name);
        let original = read(&saved)?;
        // A single-plugin configuration became a .conflist beside it.
        let is_conf = serde_json::from_str::<Value>(&original)
            .map(|v| v.get("plugins").is_none())
            .unwrap_or(false);
        // Where divert's entry lives: the file itself, or the .conflist a
        // .conf became.
        let current_path = if is_conf {
            path.with_extension("conflist")
        } else {
            path.clone()
        };
        match read(&current_path) {
            Ok(current) => {
                let ours_untouched = if is_conf {
                    true
                } else {
                    serde_json::from_str::<Value>(&without_ours(&current)?)?
                        == serde_json::from_str::<Value>(&original)?
                };
                if ours_untouched {
                    if is_conf {
                        fs::remove_file(&current_path)?;
                    }
                    write_atomic(&path, original.as_bytes(), 0o644)?;
                } else {
                    // The primary rewrote it since: keep its file, minus divert.
                    write_atomic(&path, without_ours(&current)?.as_bytes(), 0o644)?;
                }
            }
            Err(_) => write_atomic(&path, original.as_bytes(), 0o644)?,
        }
        fs::remove_file(&saved)?;
        restored.push(path);
    }
    match fs::remove_file(bin_dir.join(PLUGIN)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {PLUGIN} from {}", bin_dir.display()))
        }
        _ => {}
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn testdata(name: &str) -> String {
        fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/testdata/cni")
                .join(name),
        )
        .unwrap()
    }

    fn entry() -> Value {
        json!({"type": PLUGIN, "daemon_socket": "/var/run/divert/divert.sock"})
    }

    const LISTS: [&str; 4] = [
        "10-calico.conflist",
        "10-flannel.conflist",
        "10-kindnet.conflist",
        "05-cilium.conflist",
    ];

    #[test]
    fn the_entry_is_spliced_in_last_and_the_rest_is_byte_for_byte() {
        for name in LISTS {
            let text = testdata(name);
            let before: Value = serde_json::from_str(&text).unwrap();
            let with = with_entry(&text, &entry()).unwrap();
            let after: Value =
                serde_json::from_str(&with).unwrap_or_else(|e| panic!("{name}: {e}\n{with}"));
            let mut want = before.clone();
            want["plugins"].as_array_mut().unwrap().push(entry());
            assert_eq!(after, want, "{name}");
            // Only the entry was added: the primary's bytes are all there.
            let (end, _) = plugins_end(&text).unwrap();
            assert!(with.starts_with(&text[..end]), "{name}");
            assert!(with.ends_with(&text[end..]), "{name}");
            // Again: replaced, not added twice.
            let again = with_entry(&with, &entry()).unwrap();
            let v: Value = serde_json::from_str(&again).unwrap();
            assert_eq!(v, want, "{name}");
        }
    }

    #[test]
    fn plugins_end_skips_strings_and_nested_lists() {
        let text = r#"{"name": "a]b", "x": [1, [2]], "plugins": [{"type": "p", "r": [[{"s": "]"}]]}], "z": []}"#;
        let (end, non_empty) = plugins_end(text).unwrap();
        assert!(non_empty);
        assert_eq!(&text[end..end + 8], r#"], "z": "#);
        assert_eq!(plugins_end(r#"{"plugins": []}"#), Some((13, false)));
    }

    #[test]
    fn install_repair_and_uninstall_on_real_configurations() {
        for name in LISTS.iter().chain(&["10-bridge.conf"]) {
            let dir = tempfile::tempdir().unwrap();
            let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
            fs::create_dir_all(&conf).unwrap();
            fs::create_dir_all(&bin).unwrap();
            let original = testdata(name);
            fs::write(conf.join(name), &original).unwrap();
            let exe = dir.path().join("divert");
            fs::write(&exe, b"binary").unwrap();
            let chained = match install(&conf, &bin, &exe, &entry()).unwrap() {
                Installed::Chained(p) => p,
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(fs::read(bin.join(PLUGIN)).unwrap(), b"binary");
            assert!(has_entry(&read(&chained).unwrap(), &entry()), "{name}");
            // The runtime's choice is the chained file.
            assert_eq!(primary(&conf).unwrap(), Some(chained.clone()), "{name}");
            // Idempotent.
            assert_eq!(
                install(&conf, &bin, &exe, &entry()).unwrap(),
                Installed::AlreadyThere(chained.clone())
            );
            // The primary rewrites its file: repaired.
            if name.ends_with(".conflist") {
                let rewritten = original.replace("\"name\"", "\"name\" ");
                fs::write(&chained, &rewritten).unwrap();
                assert_eq!(
                    install(&conf, &bin, &exe, &entry()).unwrap(),
                    Installed::Chained(chained.clone())
                );
                assert!(has_entry(&read(&chained).unwrap(), &entry()));
                // Uninstall gives the primary's latest file back, byte for byte.
                uninstall(&conf, &bin).unwrap();
                assert_eq!(
                    fs::read_to_string(conf.join(name)).unwrap(),
                    rewritten,
                    "{name}"
                );
            } else {
                uninstall(&conf, &bin).unwrap();
                assert_eq!(
                    fs::read_to_string(conf.join(name)).unwrap(),
                    original,
                    "{name}"
                );
                assert!(!chained.exists(), "{name}: the conflist it became is gone");
            }
            assert!(!bin.join(PLUGIN).exists());
            let left: Vec<_> = fs::read_dir(&conf)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(left.len(), 1, "{name}: {left:?}");
        }
    }

    #[test]
    fn nothing_to_chain_into_is_said_not_invented() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("divert");
        fs::write(&exe, b"x").unwrap();
        assert_eq!(
            install(dir.path(), dir.path(), &exe, &entry()).unwrap(),
            Installed::NoPrimary
        );
        let bad = dir.path().join("00-bad.conflist");
        fs::write(&bad, "{not json").unwrap();
        let e = install(dir.path(), dir.path(), &exe, &entry()).unwrap_err();
        assert!(format!("{e:#}").contains("00-bad.conflist"), "{e:#}");
    }
}
