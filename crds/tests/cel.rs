//! The CRD's CEL rules (`x-kubernetes-validations`) evaluated client-side with
//! kube's `cel` feature (a dev-dependency only), applying the schema's
//! defaults first as the API server does.

use kube::core::cel::{
    analyze_rule, compile_schema, CompiledSchema, ErrorKind, ScopeContext, ValidationError,
    Validator,
};
use lockd_crds::{LockCluster, LockClusterSpec, LockdSettings};
use serde_json::{json, Value};

fn schema() -> Value {
    let crd = lockd_crds::crd();
    let s = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("openAPIV3Schema");
    serde_json::to_value(s).expect("schema serializes")
}

/// The schema compiled once per test (compiling is the slow part).
struct Rules {
    validator: Validator,
    compiled: CompiledSchema,
}

impl Rules {
    fn new() -> Self {
        Self {
            validator: Validator::new(),
            compiled: compile_schema(&schema()),
        }
    }

    /// Validation errors for `object` (a whole LockCluster as JSON), after
    /// applying the schema's defaults.
    fn errors(&self, object: &Value) -> Vec<ValidationError> {
        match self
            .validator
            .validate_compiled(&self.compiled, object, None)
        {
            Ok(()) => Vec::new(),
            Err(e) => e.into_vec(),
        }
    }
}

fn cluster(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "lockd.dev/v1alpha1",
        "kind": "LockCluster",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

#[test]
fn every_rule_compiles_and_passes_static_analysis() {
    let rules = Rules::new();
    let errs = rules.compiled.compilation_errors();
    assert!(errs.is_empty(), "CEL rules that do not compile: {errs:?}");
    let mut warnings = Vec::new();
    let mut count = 0;
    analyze(&schema(), &rules.compiled, &mut count, &mut warnings);
    assert_eq!(
        count, 4,
        "rules found: root name, spec replicas, lockd timing and TTLs"
    );
    assert!(warnings.is_empty(), "{warnings:#?}");
}

/// Scope and cost analysis of every rule, walking the JSON and the compiled
/// schema side by side.
fn analyze(
    node: &Value,
    compiled: &CompiledSchema,
    count: &mut usize,
    warnings: &mut Vec<kube::core::cel::AnalysisWarning>,
) {
    for r in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let rule = r["rule"].as_str().expect("rule");
        *count += 1;
        warnings.extend(analyze_rule(rule, compiled, ScopeContext::CrdValidation));
    }
    for (name, p) in node["properties"].as_object().into_iter().flatten() {
        if let Some(c) = compiled.properties.get(name) {
            analyze(p, c, count, warnings);
        }
    }
    if let (Some(items), Some(c)) = (node.get("items"), compiled.items.as_deref()) {
        analyze(items, c, count, warnings);
    }
}

#[test]
fn minimal_cluster_passes() {
    let rules = Rules::new();
    let errs = rules.errors(&cluster("demo", json!({"replicas": 3, "version": "0.1.0"})));
    assert!(errs.is_empty(), "{errs:?}");
    // The typed object, fully serialized, passes as well.
    let typed = LockCluster::new("demo", LockClusterSpec::new(3, "0.1.0"));
    let errs = rules.errors(&serde_json::to_value(&typed).expect("serialize"));
    assert!(errs.is_empty(), "{errs:?}");
}

#[test]
fn replicas_must_be_odd() {
    let rules = Rules::new();
    for n in [1, 3, 5, 7, 9] {
        let errs = rules.errors(&cluster("demo", json!({"replicas": n, "version": "0.1.0"})));
        assert!(errs.is_empty(), "replicas {n}: {errs:?}");
    }
    for n in [2, 4, 6, 8] {
        let errs = rules.errors(&cluster("demo", json!({"replicas": n, "version": "0.1.0"})));
        assert_eq!(errs.len(), 1, "replicas {n}: {errs:?}");
        assert_eq!(errs[0].kind, ErrorKind::ValidationFailure);
        assert!(
            errs[0].message.contains("replicas must be odd"),
            "{}",
            errs[0].message
        );
        assert!(
            errs[0].field_path.ends_with("spec.replicas"),
            "{}",
            errs[0].field_path
        );
    }
}

/// The CRD accepts exactly the timing lockd itself accepts at start
/// (`LockdSettings::check` mirrors lockd's flag validation).
#[test]
fn election_timeout_rule_agrees_with_lockd() {
    let rules = Rules::new();
    for heartbeat in [1_u64, 2, 50, 100, 101, 333] {
        for election in (0..=6 * heartbeat).step_by(1.max(heartbeat as usize / 20)) {
            if election == 0 {
                continue; // below the schema minimum, not a CEL matter
            }
            let settings = LockdSettings {
                election_timeout_ms: election,
                heartbeat_ms: heartbeat,
                ..LockdSettings::default()
            };
            let errs = rules.errors(&cluster(
                "demo",
                json!({"replicas": 3, "version": "0.1.0", "lockd": settings}),
            ));
            assert_eq!(
                errs.is_empty(),
                settings.check().is_ok(),
                "election {election} heartbeat {heartbeat}: CEL {errs:?}"
            );
        }
    }
}

#[test]
fn partial_settings_are_checked_against_defaults() {
    let rules = Rules::new();
    // heartbeatMs alone: electionTimeoutMs defaults to 1000, 1000*2/5 = 400.
    let ok = rules.errors(&cluster(
        "demo",
        json!({"replicas": 3, "version": "0.1.0", "lockd": {"heartbeatMs": 399}}),
    ));
    assert!(ok.is_empty(), "{ok:?}");
    let bad = rules.errors(&cluster(
        "demo",
        json!({"replicas": 3, "version": "0.1.0", "lockd": {"heartbeatMs": 400}}),
    ));
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].message.contains("2.5 x heartbeatMs"),
        "{}",
        bad[0].message
    );
}

#[test]
fn session_ttl_bounds_are_ordered() {
    let rules = Rules::new();
    let spec = |min: u64, max: u64| {
        json!({"replicas": 1, "version": "0.1.0",
               "lockd": {"sessionMinTtlMs": min, "sessionMaxTtlMs": max}})
    };
    assert!(rules.errors(&cluster("demo", spec(1000, 1000))).is_empty());
    let errs = rules.errors(&cluster("demo", spec(2000, 1000)));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].message.contains("sessionMinTtlMs"),
        "{}",
        errs[0].message
    );
}

#[test]
fn cluster_name_must_fit_child_object_names() {
    let rules = Rules::new();
    let spec = json!({"replicas": 3, "version": "0.1.0"});
    let longest = "a".repeat(lockd_crds::MAX_CLUSTER_NAME_LEN);
    for ok in ["demo", "a", "locks-prod-2", longest.as_str()] {
        let errs = rules.errors(&cluster(ok, spec.clone()));
        assert!(errs.is_empty(), "{ok}: {errs:?}");
    }
    let too_long = "a".repeat(lockd_crds::MAX_CLUSTER_NAME_LEN + 1);
    for bad in ["1demo", "demo.prod", "demo-", too_long.as_str()] {
        let errs = rules.errors(&cluster(bad, spec.clone()));
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert!(errs[0].message.contains("DNS-1035"), "{}", errs[0].message);
    }
}
