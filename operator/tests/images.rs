//! The images' Dockerfiles agree with what the operator's Pods and the
//! install manifests assume of them: the binaries they build and where they
//! put them, the user they run as, the data directory, the image names.
//!
//! Building the images needs a container runtime and base images from a
//! registry, and CI has neither; these checks catch the drift that would
//! otherwise show only on a real cluster (a renamed binary, a changed uid).

use std::path::PathBuf;

use lockd_operator::resources::{DATA_MOUNT_PATH, LOCKD_UID};

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The packages of the build stage's `cargo build` (its `-p` arguments).
fn built_packages(dockerfile: &str) -> Vec<String> {
    let build = dockerfile
        .split("cargo build")
        .nth(1)
        .expect("a cargo build step");
    let line = build.split("&&").next().unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1].to_string())
        .collect()
}

/// Whether `package`'s manifest declares a binary named `bin`.
fn declares_bin(package_dir: &str, bin: &str) -> bool {
    repo_file(&format!("{package_dir}/Cargo.toml"))
        .split("[[bin]]")
        .skip(1)
        .any(|b| b.contains(&format!("name = \"{bin}\"")))
}

#[test]
fn lockd_image_holds_what_member_pods_run() {
    let d = repo_file("Dockerfile.lockd");
    assert_eq!(built_packages(&d), ["lockd", "lockd-client"]);
    assert!(declares_bin("lockd", "lockd"));
    assert!(declares_bin("client", "lockctl"));
    // Member Pods run the command `lockd`, found on the image's PATH.
    assert!(d.contains("cp target/release/lockd target/release/lockctl /out/"));
    assert!(d.contains("COPY --from=build /out/lockd /out/lockctl /usr/local/bin/"));
    // The Pods' securityContext and data volume: the image's user owns the
    // data directory the volume is mounted on.
    assert!(d.contains(&format!("USER {LOCKD_UID}:{LOCKD_UID}")), "user");
    assert!(
        d.contains(&format!(
            "install -d -o {LOCKD_UID} -g {LOCKD_UID} -m 0750 {DATA_MOUNT_PATH}"
        )),
        "data directory"
    );
    // The tag in its usage line is the operator's default image.
    assert!(d.contains(&format!(
        "-t {}:0.1.0",
        lockd_crds::DEFAULT_IMAGE_REPOSITORY
    )));
}

#[test]
fn operator_image_runs_the_deployment_command() {
    let d = repo_file("Dockerfile.operator");
    assert_eq!(built_packages(&d), ["lockd-operator"]);
    assert!(declares_bin("operator", "lockd-operator"));
    assert!(d.contains("COPY --from=build /out/lockd-operator /usr/local/bin/"));

    let deployment = repo_file("manifests/deployment.yaml");
    let image = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .expect("the Deployment names an image");
    assert!(
        d.contains(&format!("-t {image} .")),
        "Dockerfile.operator's usage line builds {image}"
    );
    assert!(deployment.contains("command: [\"lockd-operator\"]"));
    for field in ["runAsUser", "runAsGroup"] {
        assert!(
            deployment.contains(&format!("{field}: 65532")),
            "Deployment {field}"
        );
    }
    assert!(d.contains("USER 65532:65532"));
}
