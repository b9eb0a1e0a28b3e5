use super::*;

fn put(path: &str, data: &str) -> Op {
    Op::Put {
        path: path.into(),
        data: data.as_bytes().to_vec(),
        expected_version: None,
        parents: false,
    }
}

fn create(path: &str, data: &str) -> Op {
    Op::Create {
        path: path.into(),
        data: data.as_bytes().to_vec(),
        parents: false,
    }
}

fn del(path: &str, recursive: bool) -> Op {
    Op::Delete {
        path: path.into(),
        expected_version: None,
        recursive,
    }
}

fn one(op: Op) -> Command {
    Command::Txn(Txn {
        compares: vec![],
        success: vec![op],
        failure: vec![],
    })
}

fn apply_ok(s: &mut State, cmd: Command) -> TxnOutcome {
    match s.apply(&cmd).0.result {
        Ok(AppliedResult::Txn(o)) => o,
        other => panic!("expected txn outcome, got {other:?}"),
    }
}

fn apply_err(s: &mut State, cmd: Command) -> ApplyError {
    match s.apply(&cmd).0.result {
        Err(e) => e,
        other => panic!("expected error, got {other:?}"),
    }
}

#[test]
fn revision_grows_by_one_per_write_txn_only() {
    let mut s = State::default();
    assert_eq!(s.revision(), 0);
    apply_ok(&mut s, one(put("/a", "1")));
    assert_eq!(s.revision(), 1);
    // A txn with several writes is one revision.
    apply_ok(
        &mut s,
        Command::Txn(Txn {
            compares: vec![],
            success: vec![put("/b", "x"), put("/c", "y"), put("/a", "2")],
            failure: vec![],
        }),
    );
    assert_eq!(s.revision(), 2);
    let a = s.get("/a").expect("a");
    let b = s.get("/b").expect("b");
    assert_eq!((a.version, a.create_revision, a.mod_revision), (2, 1, 2));
    assert_eq!((b.version, b.create_revision, b.mod_revision), (1, 2, 2));
    // Reads and failed writes do not move the revision.
    apply_ok(&mut s, one(Op::Get { path: "/a".into() }));
    apply_err(&mut s, one(create("/a", "again")));
    assert_eq!(s.revision(), 2);
}

#[test]
fn create_requires_parent_unless_parents() {
    let mut s = State::default();
    let e = apply_err(&mut s, one(create("/x/y", "v")));
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.contains("parent /x does not exist"),
        "{}",
        e.message
    );
    apply_ok(
        &mut s,
        one(Op::Create {
            path: "/x/y/z".into(),
            data: b"v".to_vec(),
            parents: true,
        }),
    );
    assert_eq!(s.get("/x").map(|n| n.num_children), Some(1));
    assert_eq!(s.get("/x/y/z").map(|n| n.data), Some(b"v".to_vec()));
    assert_eq!(s.get("/x/y").map(|n| n.create_revision), Some(1));
    let e = apply_err(&mut s, one(create("/x", "")));
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
}

#[test]
fn put_expected_version() {
    let mut s = State::default();
    let e = apply_err(
        &mut s,
        one(Op::Put {
            path: "/a".into(),
            data: vec![],
            expected_version: Some(1),
            parents: false,
        }),
    );
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    // expected_version 0 means "must not exist".
    apply_ok(
        &mut s,
        one(Op::Put {
            path: "/a".into(),
            data: b"1".to_vec(),
            expected_version: Some(0),
            parents: false,
        }),
    );
    apply_ok(
        &mut s,
        one(Op::Put {
            path: "/a".into(),
            data: b"2".to_vec(),
            expected_version: Some(1),
            parents: false,
        }),
    );
    assert_eq!(s.get("/a").map(|n| n.version), Some(2));
}

#[test]
fn delete_non_empty_needs_recursive_and_counts() {
    let mut s = State::default();
    apply_ok(&mut s, one(put("/d", "")));
    apply_ok(&mut s, one(put("/d/a", "")));
    apply_ok(&mut s, one(put("/d/a/b", "")));
    let e = apply_err(&mut s, one(del("/d", false)));
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert!(e.message.contains("recursive"));
    let o = apply_ok(&mut s, one(del("/d", true)));
    assert_eq!(o.results, vec![OpResult::Delete { deleted: 3 }]);
    assert!(s.get("/d/a/b").is_none());
    assert_eq!(s.get("/").map(|n| n.num_children), Some(0));
    assert_eq!(
        apply_err(&mut s, one(del("/d", false))).kind,
        ErrorKind::NotFound
    );
    assert_eq!(
        apply_err(&mut s, one(del("/", true))).kind,
        ErrorKind::InvalidArgument
    );
}

#[test]
fn txn_is_all_or_nothing() {
    let mut s = State::default();
    apply_ok(&mut s, one(put("/keep", "v1")));
    apply_ok(&mut s, one(put("/dir", "")));
    apply_ok(&mut s, one(put("/dir/child", "c")));
    let before = s.clone();
    // Several mutations, then an op that fails: nothing may stick.
    let e = apply_err(
        &mut s,
        Command::Txn(Txn {
            compares: vec![],
            success: vec![
                put("/keep", "v2"),
                put("/new", "n"),
                del("/dir", true),
                create("/keep", "dup"),
            ],
            failure: vec![],
        }),
    );
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    assert!(e.message.starts_with("op 3:"), "{}", e.message);
    assert_eq!(s, before);
}

#[test]
fn compares_choose_the_branch() {
    let mut s = State::default();
    apply_ok(&mut s, one(put("/cfg", "on")));
    apply_ok(&mut s, one(put("/cfg", "off")));
    let c = |target, op| Compare {
        path: "/cfg".into(),
        op,
        target,
    };
    let holds = |s: &State, cmp: Compare| s.compare_holds(&cmp);
    assert!(holds(&s, c(Target::Exists(true), CmpOp::Equal)));
    assert!(holds(&s, c(Target::Version(2), CmpOp::Equal)));
    assert!(holds(&s, c(Target::Version(3), CmpOp::Less)));
    assert!(holds(&s, c(Target::CreateRevision(1), CmpOp::Equal)));
    assert!(holds(&s, c(Target::ModRevision(1), CmpOp::Greater)));
    assert!(holds(&s, c(Target::Value(b"off".to_vec()), CmpOp::Equal)));
    assert!(holds(&s, c(Target::Value(b"on".to_vec()), CmpOp::NotEqual)));
    let missing = |target| Compare {
        path: "/missing".into(),
        op: CmpOp::Equal,
        target,
    };
    assert!(holds(&s, missing(Target::Exists(false))));
    assert!(holds(&s, missing(Target::Version(0))));
    assert!(!holds(&s, missing(Target::Value(vec![]))));

    let txn = |target| {
        Command::Txn(Txn {
            compares: vec![c(target, CmpOp::Equal)],
            success: vec![put("/cfg", "then")],
            failure: vec![Op::Get {
                path: "/cfg".into(),
            }],
        })
    };
    let o = apply_ok(&mut s, txn(Target::Version(1)));
    assert!(!o.succeeded);
    assert!(matches!(&o.results[0], OpResult::Get(Some(n)) if n.data == b"off"));
    assert_eq!(s.revision(), 2);
    let o = apply_ok(&mut s, txn(Target::Version(2)));
    assert!(o.succeeded);
    assert_eq!(s.get("/cfg").map(|n| n.data), Some(b"then".to_vec()));
    assert_eq!(s.revision(), 3);
}

#[test]
fn reads_inside_txn_see_earlier_ops() {
    let mut s = State::default();
    let o = apply_ok(
        &mut s,
        Command::Txn(Txn {
            compares: vec![],
            success: vec![put("/a", "1"), Op::Get { path: "/a".into() }],
            failure: vec![],
        }),
    );
    assert!(matches!(&o.results[1], OpResult::Get(Some(n)) if n.mod_revision == 1));
}

#[test]
fn apply_is_deterministic() {
    let cmds: Vec<Command> = (0..200)
        .map(|i| match i % 5 {
            0 => one(put(&format!("/k{}", i % 17), &i.to_string())),
            1 => one(create(&format!("/k{}", i % 13), "c")),
            2 => one(del(&format!("/k{}", i % 11), false)),
            3 => Command::Txn(Txn {
                compares: vec![Compare {
                    path: format!("/k{}", i % 7),
                    op: CmpOp::Greater,
                    target: Target::Version(1),
                }],
                success: vec![put("/hits", &i.to_string())],
                failure: vec![put("/misses", &i.to_string())],
            }),
            _ => Command::BindInstance {
                node_id: i % 3,
                instance: format!("inst-{}", i % 2),
            },
        })
        .collect();
    let run = || {
        let mut s = State::default();
        let outs: Vec<_> = cmds.iter().map(|c| s.apply(c)).collect();
        (s, outs)
    };
    let (a, ra) = run();
    let (b, rb) = run();
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    let bytes = postcard::to_stdvec(&a).expect("encode");
    let back: State = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(back, a);
}

#[test]
fn node_ids_are_bound_once() {
    let mut s = State::default();
    let bind = |id: u64, inst: &str| Command::BindInstance {
        node_id: id,
        instance: inst.into(),
    };
    assert_eq!(s.apply(&bind(1, "aaa")).0.result, Ok(AppliedResult::Bound));
    assert_eq!(s.apply(&bind(1, "aaa")).0.result, Ok(AppliedResult::Bound));
    let e = s
        .apply(&bind(1, "bbb"))
        .0
        .result
        .expect_err("rebind refused");
    assert!(e.message.contains("already used"), "{}", e.message);
    assert_eq!(s.instance_of(1), Some("aaa"));
}

#[test]
fn events_describe_the_change() {
    let mut s = State::default();
    let (_, ev) = s.apply(&one(put("/a", "1")));
    assert!(matches!(&ev[..], [Event::Put(n)] if n.path == "/a" && n.mod_revision == 1));
    let (_, ev) = s.apply(&one(del("/a", false)));
    assert_eq!(
        ev,
        vec![Event::Delete {
            path: "/a".into(),
            mod_revision: 2
        }]
    );
    let (_, ev) = s.apply(&one(create("/a", "x")));
    assert_eq!(ev.len(), 1);
    let (_, ev) = s.apply(&one(create("/a", "x")));
    assert!(ev.is_empty());
}

#[test]
fn list_returns_children_without_data() {
    let mut s = State::default();
    apply_ok(&mut s, one(put("/d", "dir")));
    apply_ok(&mut s, one(put("/d/b", "2")));
    apply_ok(&mut s, one(put("/d/a", "1")));
    let (node, children) = s.list("/d").expect("listed");
    assert_eq!(node.data, b"dir");
    let names: Vec<_> = children.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(names, vec!["/d/a", "/d/b"]);
    assert!(children.iter().all(|c| c.data.is_empty()));
    assert!(s.list("/nope").is_none());
}
