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
    let cfg =
        cwreap::config::parse(policy, "configmap/cwreap.yaml").unwrap_or_else(|e| panic!("{e}"));
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
        ["DAC_READ_SEARCH", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/cwreap/cwreap.yaml"]);
    let mount = &c["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/cwreap");
    assert_eq!(mount["readOnly"], true);
}
