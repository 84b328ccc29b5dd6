//! The shipped Kubernetes example: it parses, its embedded policy validates, and it asks
//! for exactly the privileges the README says it needs.

use std::path::PathBuf;

use serde_json::Value;

fn docs() -> Vec<Value> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/cwreap-daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("read the DaemonSet example");
    serde_saphyr::from_multiple(&text).expect("valid multi-document YAML")
}

#[test]
fn configmap_policy_validates() {
    let docs = docs();
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let policy = cm["data"]["cwreap.yaml"]
        .as_str()
        .expect("cwreap.yaml in the ConfigMap");
    let cfg = cwreap::shared::config::parse(policy, "configmap/cwreap.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.dry_run, "the example must be safe by default");
}

#[test]
fn daemonset_is_privileged_only_as_far_as_needed() {
    let docs = docs();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostPID"], true,
        "pidfd_getfd needs the pods' pid namespace"
    );
    assert!(
        spec["hostNetwork"].is_null(),
        "no hostNetwork: cwreap enters namespaces itself"
    );
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut added: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    added.sort_unstable();
    assert_eq!(
        added,
        [
            "BPF",
            "DAC_READ_SEARCH",
            "NET_ADMIN",
            "PERFMON",
            "SYS_ADMIN",
            "SYS_PTRACE"
        ]
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/cwreap/cwreap.yaml"]);
    let command: Vec<&str> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(command, [containerfile_binary().as_str()]);
    let mount = &c["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/cwreap");
    assert_eq!(mount["readOnly"], true);
}

/// Events mode: the policy asks for it, the node's BPF filesystem is where the pins go, and
/// the memory limit leaves room for loading the programs.
#[test]
fn daemonset_runs_in_events_mode() {
    let docs = docs();
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let policy = cm["data"]["cwreap.yaml"].as_str().expect("cwreap.yaml");
    let cfg = cwreap::shared::config::parse(policy, "configmap/cwreap.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.discovery, cwreap::shared::config::Discovery::Events);

    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let bpf = mounts
        .iter()
        .find(|m| m["mountPath"] == "/sys/fs/bpf")
        .expect("the node's /sys/fs/bpf mounted");
    assert_ne!(bpf["readOnly"], true, "the daemon pins there");
    let volume = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == bpf["name"])
        .expect("the bpffs volume");
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/bpf");
    // The daemon's own memory (P4: about 22 MiB at 20000 sockets) and the loader's 21 MiB.
    let limit = c["resources"]["limits"]["memory"]
        .as_str()
        .and_then(|m| m.strip_suffix("Mi"))
        .and_then(|m| m.parse::<u32>().ok())
        .expect("a memory limit in Mi");
    assert!(limit >= 22 + 21 + 32, "memory limit {limit}Mi");
    let sc = &c["securityContext"];
    assert_eq!(sc["seccompProfile"]["type"], "Unconfined", "bpf() allowed");
}

/// Where deploy/Containerfile puts the binary in the runtime image, checked against its
/// ENTRYPOINT: the path the DaemonSet's command must run.
fn containerfile_binary() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/Containerfile");
    let text = std::fs::read_to_string(&path).expect("read deploy/Containerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    let runtime = &lines[*stages.last().expect("a stage")..];
    let copied = runtime
        .iter()
        .find_map(|l| {
            let rest = l.strip_prefix("COPY --from=build ")?;
            let (src, dst) = rest.split_once(' ')?;
            src.ends_with("target/release/cwreap")
                .then(|| dst.trim().to_owned())
        })
        .expect("the runtime stage copies target/release/cwreap");
    let entry = runtime
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).expect("ENTRYPOINT in exec form");
    assert_eq!(
        entry,
        std::slice::from_ref(&copied),
        "ENTRYPOINT runs the copied binary"
    );
    // The build stage builds exactly that binary, from the lock file.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("RUN cargo build --release --locked")),
        "{lines:?}"
    );
    copied
}

#[test]
fn containerfile_builds_the_binary_the_daemonset_runs() {
    assert_eq!(containerfile_binary(), "/usr/bin/cwreap");
}
