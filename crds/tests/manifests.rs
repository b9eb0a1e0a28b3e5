//! Checks of the operator's install manifests (`manifests/`) that need no API
//! server: every file parses and names its objects, the kustomization installs
//! everything but the CRD and the sample, the Deployment runs as the
//! ServiceAccount the bindings bind, the RBAC is the least the operator needs
//! (no wildcards, Leases only in its own namespace), no object carries a field
//! its typed API does not know (a typo the API server would drop silently),
//! and the sample `LockCluster` is one the CRD accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use kube::core::cel::Validator;
use lockd_crds::{LockCluster, MAX_CLUSTER_NAME_LEN, MAX_REPLICAS, MIN_REPLICAS};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Namespace the operator is installed into.
const NAMESPACE: &str = "lockd-system";
/// The operator's ServiceAccount.
const SERVICE_ACCOUNT: &str = "lockd-operator";
/// The sample, relative to `manifests/`.
const SAMPLE: &str = "samples/lockcluster.yaml";
const KUSTOMIZATION: &str = "kustomization.yaml";

/// Everything the ClusterRole may grant, by (API group, resource): exactly
/// these verbs, nothing more and nothing less.
const CLUSTER_GRANTS: &[(&str, &str, &[&str])] = &[
    (
        "lockd.dev",
        "lockclusters",
        &["get", "list", "watch", "patch"],
    ),
    (
        "lockd.dev",
        "lockclusters/status",
        &["get", "patch", "update"],
    ),
    ("lockd.dev", "lockclusters/finalizers", &["update"]),
    (
        "",
        "pods",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("", "services", &["get", "list", "watch", "create", "patch"]),
    (
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch"],
    ),
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    (
        "policy",
        "poddisruptionbudgets",
        &["get", "list", "watch", "create", "patch"],
    ),
];

/// What the leader-election Role grants, in the operator's namespace only.
const LEASE_GRANTS: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// One YAML document of one file.
struct Doc {
    /// Path relative to `manifests/`, with `/` separators.
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }

    fn typed<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone()).unwrap_or_else(|e| {
            panic!(
                "{}: {} {} does not deserialize: {e}",
                self.file,
                self.kind(),
                self.name()
            )
        })
    }
}

/// Every `*.yaml`/`*.yml` file under `dir`, as paths relative to it, sorted.
fn yaml_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path.strip_prefix(root).expect("under the root");
                let parts: Vec<_> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The documents of one file (relative to `manifests/`), empty ones skipped.
fn load(file: &str) -> Vec<Doc> {
    let path = manifests_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let values: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
    values
        .into_iter()
        .filter(|v| !v.is_null())
        .map(|value| Doc {
            file: file.to_string(),
            value,
        })
        .collect()
}

/// The files `kustomization.yaml` lists under `resources`.
fn kustomization_resources() -> Vec<String> {
    let docs = load(KUSTOMIZATION);
    assert_eq!(docs.len(), 1, "{KUSTOMIZATION}: one document");
    let k = &docs[0].value;
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    k["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("{KUSTOMIZATION}: resources must be a list"))
        .iter()
        .map(|r| {
            r.as_str()
                .unwrap_or_else(|| panic!("{KUSTOMIZATION}: resource {r} is not a path"))
                .to_string()
        })
        .collect()
}

/// The objects `kubectl apply -k manifests/` installs.
fn installed() -> Vec<Doc> {
    kustomization_resources()
        .iter()
        .flat_map(|f| load(f))
        .collect()
}

fn of_kind<'a>(docs: &'a [Doc], kind: &str) -> Vec<&'a Doc> {
    docs.iter().filter(|d| d.kind() == kind).collect()
}

/// The single Deployment the kustomization installs.
fn operator_deployment(docs: &[Doc]) -> (&Doc, Deployment) {
    let deployments = of_kind(docs, "Deployment");
    assert_eq!(deployments.len(), 1, "exactly one Deployment is installed");
    let doc = deployments[0];
    (doc, doc.typed())
}

/// Whether `a` is contained in `b`: every key of every object of `a` is in
/// `b` with a contained value, arrays match element by element, scalars are
/// equal. Reports the paths that are not.
fn uncontained(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => uncontained(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                uncontained(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path} ({a} became {b})")),
    }
}

/// Deserializes a document into its typed API object and serializes it back:
/// anything the type does not know (a misspelled or misplaced field, which
/// the API server would prune or reject) goes missing on the way.
fn assert_round_trips<T: DeserializeOwned + Serialize>(doc: &Doc) {
    let typed: T = doc.typed();
    let back = serde_json::to_value(&typed).expect("serializes");
    let mut lost = Vec::new();
    uncontained(&doc.value, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{}: {} {} has fields its API type does not know: {lost:?}",
        doc.file,
        doc.kind(),
        doc.name()
    );
}

/// Rules flattened to (API group, resource) -> verbs.
fn grants(rules: &[PolicyRule]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                out.entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    out
}

fn expected(table: &[(&str, &str, &[&str])]) -> BTreeMap<(String, String), BTreeSet<String>> {
    table
        .iter()
        .map(|(g, r, verbs)| {
            (
                (g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

/// No wildcard and no non-resource URL anywhere in `rules`.
fn assert_no_wildcards(what: &str, rules: &[PolicyRule]) {
    for rule in rules {
        let fields = [
            ("apiGroups", rule.api_groups.as_deref().unwrap_or_default()),
            ("resources", rule.resources.as_deref().unwrap_or_default()),
            (
                "resourceNames",
                rule.resource_names.as_deref().unwrap_or_default(),
            ),
            ("verbs", rule.verbs.as_slice()),
        ];
        for (field, values) in fields {
            assert!(
                !values.iter().any(|v| v.contains('*')),
                "{what}: wildcard in {field}: {values:?}"
            );
        }
        assert!(
            rule.non_resource_urls.is_none(),
            "{what}: grants non-resource URLs"
        );
        assert!(
            rule.api_groups.as_ref().is_some_and(|g| !g.is_empty())
                && rule.resources.as_ref().is_some_and(|r| !r.is_empty())
                && !rule.verbs.is_empty(),
            "{what}: every rule names API groups, resources and verbs: {rule:?}"
        );
    }
}

fn binds_operator(subjects: Option<&Vec<Subject>>, sa: &str, namespace: &str) -> bool {
    subjects.into_iter().flatten().any(|s| {
        s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(namespace)
    })
}

#[test]
fn every_file_parses_and_names_its_objects() {
    let files = yaml_files(&manifests_dir());
    assert!(files.iter().any(|f| f == KUSTOMIZATION), "{files:?}");
    assert!(files.iter().any(|f| f == SAMPLE), "{files:?}");
    let mut seen = BTreeSet::new();
    for file in &files {
        let docs = load(file);
        assert!(!docs.is_empty(), "{file}: no YAML document");
        for doc in &docs {
            assert!(doc.value.is_object(), "{file}: a document is not a mapping");
            for field in ["apiVersion", "kind"] {
                assert!(
                    doc.value[field].as_str().is_some_and(|s| !s.is_empty()),
                    "{file}: a document has no {field}"
                );
            }
            assert!(
                !doc.name().is_empty(),
                "{file}: a {} has no metadata.name",
                doc.kind()
            );
            let key = (
                doc.value["apiVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                doc.kind().to_string(),
                doc.namespace().unwrap_or_default().to_string(),
                doc.name().to_string(),
            );
            assert!(seen.insert(key.clone()), "{file}: {key:?} is defined twice");
        }
    }
}

#[test]
fn kustomization_installs_everything_but_the_crd_and_the_sample() {
    let dir = manifests_dir();
    let resources = kustomization_resources();
    let listed: BTreeSet<&str> = resources.iter().map(String::as_str).collect();
    assert_eq!(listed.len(), resources.len(), "duplicates in {resources:?}");
    for r in &resources {
        assert!(
            dir.join(r).is_file(),
            "{KUSTOMIZATION} lists {r}, which does not exist"
        );
        assert!(
            !r.contains("..") && !r.contains("crds") && !r.starts_with('/'),
            "{KUSTOMIZATION} must not install {r}: the CRD is applied from crds/ first"
        );
    }
    assert!(
        !listed.contains(SAMPLE),
        "the sample is not part of the install"
    );
    // Every top-level manifest is installed; subdirectories (samples/) are not.
    let top_level: BTreeSet<String> = yaml_files(&dir)
        .into_iter()
        .filter(|f| !f.contains('/') && f != KUSTOMIZATION)
        .collect();
    let listed: BTreeSet<String> = resources.iter().cloned().collect();
    assert_eq!(
        listed, top_level,
        "{KUSTOMIZATION} resources vs manifests/*.yaml"
    );
    // No installed object is a CustomResourceDefinition or a LockCluster.
    for doc in installed() {
        assert!(
            !matches!(doc.kind(), "CustomResourceDefinition" | "LockCluster"),
            "{}: {} {} must not be installed by the kustomization",
            doc.file,
            doc.kind(),
            doc.name()
        );
    }
}

#[test]
fn installed_objects_have_only_known_fields_and_live_in_the_operator_namespace() {
    let docs = installed();
    let namespaces: Vec<Namespace> = of_kind(&docs, "Namespace")
        .iter()
        .map(|d| d.typed())
        .collect();
    assert_eq!(namespaces.len(), 1);
    assert_eq!(namespaces[0].metadata.name.as_deref(), Some(NAMESPACE));
    for doc in &docs {
        let cluster_scoped = match (doc.value["apiVersion"].as_str(), doc.kind()) {
            (Some("v1"), "Namespace") => {
                assert_round_trips::<Namespace>(doc);
                true
            }
            (Some("v1"), "ServiceAccount") => {
                assert_round_trips::<ServiceAccount>(doc);
                false
            }
            (Some("apps/v1"), "Deployment") => {
                assert_round_trips::<Deployment>(doc);
                false
            }
            (Some("rbac.authorization.k8s.io/v1"), "ClusterRole") => {
                assert_round_trips::<ClusterRole>(doc);
                true
            }
            (Some("rbac.authorization.k8s.io/v1"), "ClusterRoleBinding") => {
                assert_round_trips::<ClusterRoleBinding>(doc);
                true
            }
            (Some("rbac.authorization.k8s.io/v1"), "Role") => {
                assert_round_trips::<Role>(doc);
                false
            }
            (Some("rbac.authorization.k8s.io/v1"), "RoleBinding") => {
                assert_round_trips::<RoleBinding>(doc);
                false
            }
            (api, kind) => panic!(
                "{}: {api:?} {kind} has no check here; add its typed round trip",
                doc.file
            ),
        };
        if cluster_scoped {
            assert_eq!(
                doc.namespace(),
                None,
                "{}: {} is cluster-scoped",
                doc.file,
                doc.name()
            );
        } else {
            assert_eq!(
                doc.namespace(),
                Some(NAMESPACE),
                "{}: {} {} belongs in {NAMESPACE}",
                doc.file,
                doc.kind(),
                doc.name()
            );
        }
    }
}

#[test]
fn deployment_runs_two_replicas_as_the_bound_service_account() {
    let docs = installed();
    let (doc, deployment) = operator_deployment(&docs);
    assert_eq!(doc.name(), "lockd-operator");
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2), "two replicas, one leader");

    // The selector selects the template.
    let selector = spec.selector.match_labels.as_ref().expect("matchLabels");
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .expect("template labels");
    assert!(selector
        .iter()
        .all(|(k, v)| template_labels.get(k) == Some(v)));

    let pod = spec.template.spec.as_ref().expect("pod spec");
    let sa = pod
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    assert_eq!(sa, SERVICE_ACCOUNT);
    assert!(
        of_kind(&docs, "ServiceAccount")
            .iter()
            .any(|d| d.name() == sa && d.namespace() == doc.namespace()),
        "ServiceAccount {sa} is installed next to the Deployment"
    );
    let namespace = doc.namespace().expect("namespace");
    let bound_by = |kind: &str| {
        of_kind(&docs, kind).iter().any(|d| {
            let subjects: Option<Vec<Subject>> =
                serde_json::from_value(d.value["subjects"].clone()).expect("subjects");
            binds_operator(subjects.as_ref(), sa, namespace)
        })
    };
    assert!(
        bound_by("ClusterRoleBinding"),
        "a ClusterRoleBinding binds {sa}"
    );
    assert!(bound_by("RoleBinding"), "a RoleBinding binds {sa}");

    // Spread over nodes, softly.
    let spread = pod
        .topology_spread_constraints
        .iter()
        .flatten()
        .any(|c| c.topology_key == "kubernetes.io/hostname");
    let anti_affinity = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .is_some_and(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .is_some()
        });
    assert!(spread || anti_affinity, "replicas are spread across nodes");

    let pod_security = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));

    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/lockd/lockd-operator:0.1.0")
    );
    assert_eq!(
        c.command.as_deref(),
        Some(&["lockd-operator".to_string()][..])
    );
    assert_eq!(
        c.args.as_deref(),
        Some(
            &[
                "--leader-election-namespace=$(POD_NAMESPACE)".to_string(),
                "--http-listen=$(POD_IP):8080".to_string(),
            ][..]
        )
    );
    let env: BTreeMap<&str, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
    ] {
        let from = env
            .get(name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|f| f.field_ref.as_ref())
            .unwrap_or_else(|| panic!("{name} comes from the downward API"));
        assert_eq!(from.field_path, field);
    }
    assert_eq!(
        env.get("LOCKD_OPERATOR_LOG")
            .and_then(|e| e.value.as_deref()),
        Some("info")
    );

    let ports = c.ports.as_deref().unwrap_or_default();
    assert!(ports
        .iter()
        .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 8080));
    let probe_path = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        probe_path(c.liveness_probe.as_ref()).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        probe_path(c.readiness_probe.as_ref()).as_deref(),
        Some("/readyz")
    );

    let resources = c.resources.as_ref().expect("resources");
    assert!(resources.requests.is_some() && resources.limits.is_some());

    let sc = c
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    assert!(sc.capabilities.as_ref().is_some_and(|c| c.add.is_none()));
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .or(pod_security.seccomp_profile.as_ref())
        .expect("seccompProfile");
    assert_eq!(seccomp.type_, "RuntimeDefault");
}

#[test]
fn bindings_reference_installed_roles_and_every_role_is_bound() {
    let docs = installed();
    let (deployment, _) = operator_deployment(&docs);
    let namespace = deployment.namespace().expect("namespace");

    let cluster_roles: BTreeSet<&str> = of_kind(&docs, "ClusterRole")
        .iter()
        .map(|d| d.name())
        .collect();
    let roles: BTreeSet<(&str, &str)> = of_kind(&docs, "Role")
        .iter()
        .map(|d| (d.namespace().unwrap_or_default(), d.name()))
        .collect();
    let mut bound_cluster_roles = BTreeSet::new();
    let mut bound_roles = BTreeSet::new();

    for doc in of_kind(&docs, "ClusterRoleBinding") {
        let b: ClusterRoleBinding = doc.typed();
        assert_eq!(
            b.role_ref.api_group.as_deref(),
            Some("rbac.authorization.k8s.io")
        );
        assert_eq!(
            b.role_ref.kind,
            "ClusterRole",
            "{}: {}",
            doc.file,
            doc.name()
        );
        assert!(
            cluster_roles.contains(b.role_ref.name.as_str()),
            "{}: ClusterRole {} is not installed",
            doc.file,
            b.role_ref.name
        );
        assert!(binds_operator(
            b.subjects.as_ref(),
            SERVICE_ACCOUNT,
            namespace
        ));
        bound_cluster_roles.insert(b.role_ref.name.clone());
    }
    for doc in of_kind(&docs, "RoleBinding") {
        let b: RoleBinding = doc.typed();
        let ns = doc.namespace().expect("RoleBinding namespace");
        assert_eq!(
            b.role_ref.api_group.as_deref(),
            Some("rbac.authorization.k8s.io")
        );
        assert_eq!(b.role_ref.kind, "Role", "{}: {}", doc.file, doc.name());
        assert!(
            roles.contains(&(ns, b.role_ref.name.as_str())),
            "{}: Role {ns}/{} is not installed",
            doc.file,
            b.role_ref.name
        );
        assert!(binds_operator(
            b.subjects.as_ref(),
            SERVICE_ACCOUNT,
            namespace
        ));
        bound_roles.insert((ns.to_string(), b.role_ref.name.clone()));
    }
    for name in &cluster_roles {
        assert!(
            bound_cluster_roles.contains(*name),
            "ClusterRole {name} is not bound"
        );
    }
    for (ns, name) in &roles {
        assert!(
            bound_roles.contains(&(ns.to_string(), name.to_string())),
            "Role {ns}/{name} is not bound"
        );
    }
}

#[test]
fn cluster_role_grants_exactly_what_the_operator_uses() {
    let docs = installed();
    let cluster_roles = of_kind(&docs, "ClusterRole");
    assert_eq!(cluster_roles.len(), 1, "one ClusterRole");
    let role: ClusterRole = cluster_roles[0].typed();
    assert!(role.aggregation_rule.is_none(), "no aggregation");
    let rules = role.rules.unwrap_or_default();
    assert_no_wildcards("ClusterRole", &rules);
    let granted = grants(&rules);
    let status = ("lockd.dev".to_string(), "lockclusters/status".to_string());
    assert!(
        granted.get(&status).is_some_and(|v| v.contains("patch")),
        "the status subresource is writable"
    );
    assert_eq!(granted, expected(CLUSTER_GRANTS));
}

#[test]
fn leases_are_granted_only_in_the_operator_namespace() {
    let docs = installed();
    let (deployment, _) = operator_deployment(&docs);
    let namespace = deployment.namespace().expect("namespace");
    for doc in of_kind(&docs, "ClusterRole") {
        let role: ClusterRole = doc.typed();
        let granted = grants(role.rules.as_deref().unwrap_or_default());
        assert!(
            !granted
                .keys()
                .any(|(g, r)| g == "coordination.k8s.io" || r == "leases"),
            "ClusterRole {} must not grant Leases",
            doc.name()
        );
    }
    let roles = of_kind(&docs, "Role");
    assert_eq!(roles.len(), 1, "one namespaced Role, for leader election");
    assert_eq!(roles[0].namespace(), Some(namespace));
    let role: Role = roles[0].typed();
    let rules = role.rules.unwrap_or_default();
    assert_no_wildcards("Role", &rules);
    assert_eq!(grants(&rules), expected(LEASE_GRANTS));
}

#[test]
fn sample_is_a_valid_odd_lock_cluster() {
    let docs = load(SAMPLE);
    assert_eq!(docs.len(), 1, "{SAMPLE}: one LockCluster");
    let doc = &docs[0];
    let lc: LockCluster = doc.typed();
    let name = lc.metadata.name.as_deref().expect("name");
    assert_eq!(name, "example");
    assert!(name.len() <= MAX_CLUSTER_NAME_LEN);
    assert_eq!(lc.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(lc.spec.replicas, 3);
    assert_eq!(lc.spec.replicas % 2, 1, "replicas must be odd");
    assert!((MIN_REPLICAS..=MAX_REPLICAS).contains(&lc.spec.replicas));
    assert_eq!(lc.spec.version, "0.1.0");
    assert_eq!(lc.spec.storage.size.0, "1Gi");
    lc.spec.lockd.check().expect("lockd settings lockd accepts");

    // Every field of the sample is one the CRD knows (the API server would
    // prune a misspelled one without a word).
    let back = serde_json::to_value(&lc).expect("serializes");
    let mut lost = Vec::new();
    uncontained(&doc.value, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{SAMPLE}: fields LockCluster does not know: {lost:?}"
    );

    // And the CRD's CEL rules accept it.
    let crd = lockd_crds::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("openAPIV3Schema");
    let schema = serde_json::to_value(schema).expect("schema serializes");
    let compiled = kube::core::cel::compile_schema(&schema);
    if let Err(e) = Validator::new().validate_compiled(&compiled, &doc.value, None) {
        panic!("{SAMPLE}: the CRD's rules reject it: {:?}", e.into_vec());
    }
}
