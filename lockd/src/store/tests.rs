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
        mode: CreateMode::default(),
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
        request: None,
    })
}

fn apply_ok(s: &mut State, cmd: Command) -> TxnOutcome {
    match s.apply(0, &cmd).0.result {
        Ok(AppliedResult::Txn(o)) => o,
        other => panic!("expected txn outcome, got {other:?}"),
    }
}

fn apply_err(s: &mut State, cmd: Command) -> ApplyError {
    match s.apply(0, &cmd).0.result {
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
            request: None,
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
            mode: CreateMode::default(),
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
            request: None,
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
            request: None,
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
            request: None,
        }),
    );
    assert!(matches!(&o.results[1], OpResult::Get(Some(n)) if n.mod_revision == 1));
}

#[test]
fn apply_is_deterministic() {
    let cmds: Vec<Command> = (0..400u64)
        .map(|i| match i % 8 {
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
                request: None,
            }),
            4 => Command::BindInstance {
                node_id: i % 3,
                instance: format!("inst-{}", i % 2),
            },
            5 => Command::OpenSession { ttl_ms: 1000 + i },
            6 => one(Op::Create {
                path: "/e-".into(),
                data: vec![],
                parents: false,
                mode: CreateMode {
                    // Session ids are the indexes of the OpenSession commands (i % 8 == 5).
                    session_id: (i / 8 * 8 + 5).saturating_sub(8),
                    sequential: true,
                    container: false,
                },
            }),
            _ => Command::ExpireSessions {
                session_ids: vec![i.saturating_sub(18)],
            },
        })
        .collect();
    let run = || {
        let mut s = State::default();
        let outs: Vec<_> = cmds
            .iter()
            .enumerate()
            .map(|(i, c)| s.apply(i as u64, c))
            .collect();
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
    assert_eq!(
        s.apply(0, &bind(1, "aaa")).0.result,
        Ok(AppliedResult::Bound)
    );
    assert_eq!(
        s.apply(0, &bind(1, "aaa")).0.result,
        Ok(AppliedResult::Bound)
    );
    let e = s
        .apply(0, &bind(1, "bbb"))
        .0
        .result
        .expect_err("rebind refused");
    assert!(e.message.contains("already used"), "{}", e.message);
    assert_eq!(s.instance_of(1), Some("aaa"));
}

#[test]
fn events_describe_the_change() {
    let mut s = State::default();
    let (_, ev) = s.apply(0, &one(put("/a", "1")));
    assert!(
        matches!(&ev[..], [Event { kind: EventKind::Put, node, prev: None }] if node.path == "/a" && node.mod_revision == 1)
    );
    let (_, ev) = s.apply(0, &one(put("/a", "2")));
    assert_eq!(
        ev[0].prev.as_ref().map(|p| p.data.clone()),
        Some(b"1".to_vec())
    );
    let (_, ev) = s.apply(0, &one(del("/a", false)));
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Delete);
    assert_eq!(
        (ev[0].node.path.as_str(), ev[0].node.mod_revision),
        ("/a", 3)
    );
    assert_eq!(
        ev[0].prev.as_ref().map(|p| p.data.clone()),
        Some(b"2".to_vec())
    );
    let (_, ev) = s.apply(0, &one(create("/a", "x")));
    assert_eq!(ev.len(), 1);
    let (_, ev) = s.apply(0, &one(create("/a", "x")));
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

fn open(s: &mut State, index: u64, ttl_ms: u64) -> u64 {
    match s.apply(index, &Command::OpenSession { ttl_ms }).0.result {
        Ok(AppliedResult::SessionOpened {
            session_id,
            ttl_ms: t,
        }) => {
            assert_eq!(t, ttl_ms);
            session_id
        }
        other => panic!("open session: {other:?}"),
    }
}

fn create_mode(path: &str, session_id: u64, sequential: bool, container: bool) -> Op {
    Op::Create {
        path: path.into(),
        data: b"d".to_vec(),
        parents: false,
        mode: CreateMode {
            session_id,
            sequential,
            container,
        },
    }
}

fn created_path(o: &TxnOutcome) -> String {
    match &o.results[0] {
        OpResult::Create(n) => n.path.clone(),
        other => panic!("expected a create result, got {other:?}"),
    }
}

#[test]
fn session_ids_come_from_the_log_index() {
    let mut s = State::default();
    assert_eq!(open(&mut s, 17, 5000), 17);
    assert_eq!(s.session(17).map(|x| x.ttl_ms), Some(5000));
    assert_eq!(s.revision(), 0, "opening a session changes no node");
}

#[test]
fn ephemerals_go_with_their_session_at_one_revision() {
    let mut s = State::default();
    let sid = open(&mut s, 5, 1000);
    apply_ok(&mut s, one(put("/svc", "")));
    apply_ok(&mut s, one(create_mode("/svc/a", sid, false, false)));
    apply_ok(&mut s, one(create_mode("/svc/b", sid, false, false)));
    let before = s.revision();
    assert_eq!(s.get("/svc/a").map(|n| n.ephemeral_owner), Some(sid));
    let (applied, events) = s.apply(9, &Command::CloseSession { session_id: sid });
    assert_eq!(
        applied.result,
        Ok(AppliedResult::SessionsEnded {
            sessions: 1,
            deleted: 2
        })
    );
    assert_eq!(
        applied.revision,
        before + 1,
        "one revision for the whole close"
    );
    assert_eq!(events.len(), 2);
    assert!(events
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.node.mod_revision == before + 1));
    assert!(s.get("/svc/a").is_none() && s.get("/svc/b").is_none());
    assert!(s.session(sid).is_none());
    // The session is gone: closing again and creating with it fail.
    let e = s
        .apply(10, &Command::CloseSession { session_id: sid })
        .0
        .result
        .expect_err("closed");
    assert_eq!(e.kind, ErrorKind::SessionExpired);
    let e = apply_err(&mut s, one(create_mode("/svc/c", sid, false, false)));
    assert_eq!(e.kind, ErrorKind::SessionExpired);
    assert!(e.message.contains("expired"), "{}", e.message);
}

#[test]
fn expiry_ends_many_sessions_and_skips_unknown_ones() {
    let mut s = State::default();
    let a = open(&mut s, 1, 1000);
    let b = open(&mut s, 2, 1000);
    let c = open(&mut s, 3, 1000);
    for (sid, p) in [(a, "/a"), (b, "/b"), (c, "/c")] {
        apply_ok(&mut s, one(create_mode(p, sid, false, false)));
    }
    let (applied, _) = s.apply(
        4,
        &Command::ExpireSessions {
            session_ids: vec![a, b, 999],
        },
    );
    assert_eq!(
        applied.result,
        Ok(AppliedResult::SessionsEnded {
            sessions: 2,
            deleted: 2
        })
    );
    assert!(s.get("/a").is_none() && s.get("/b").is_none());
    assert!(s.get("/c").is_some());
}

#[test]
fn ephemeral_nodes_cannot_have_children() {
    let mut s = State::default();
    let sid = open(&mut s, 1, 1000);
    apply_ok(&mut s, one(create_mode("/e", sid, false, false)));
    let e = apply_err(&mut s, one(create("/e/child", "x")));
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert!(e.message.contains("ephemeral"), "{}", e.message);
    let e = apply_err(&mut s, one(put("/e/child", "x")));
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
}

#[test]
fn sequential_names_are_unique_increasing_and_padded() {
    let mut s = State::default();
    let sid = open(&mut s, 1, 1000);
    apply_ok(&mut s, one(put("/locks", "")));
    let mut names = Vec::new();
    for i in 0..12 {
        // Mix persistent and ephemeral, and delete some: numbers never repeat.
        let owner = if i % 2 == 0 { sid } else { 0 };
        let o = apply_ok(&mut s, one(create_mode("/locks/lock-", owner, true, false)));
        names.push(created_path(&o));
        if i % 3 == 0 {
            apply_ok(&mut s, one(del(&created_path(&o), false)));
        }
    }
    assert_eq!(names[0], "/locks/lock-0000000000");
    assert_eq!(names[11], "/locks/lock-0000000011");
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, names, "unique and increasing");
    // A failed transaction does not consume a number.
    let e = apply_err(
        &mut s,
        Command::Txn(Txn {
            compares: vec![],
            success: vec![
                create_mode("/locks/lock-", 0, true, false),
                create("/locks", "dup"),
            ],
            failure: vec![],
            request: None,
        }),
    );
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    let o = apply_ok(&mut s, one(create_mode("/locks/lock-", 0, true, false)));
    assert_eq!(created_path(&o), "/locks/lock-0000000012");
}

#[test]
fn containers_go_after_their_last_child_and_not_before() {
    let mut s = State::default();
    let sid = open(&mut s, 1, 1000);
    apply_ok(&mut s, one(create_mode("/locks", 0, false, true)));
    // An empty container that never had a child stays.
    assert!(s.get("/locks").is_some());
    apply_ok(&mut s, one(create_mode("/locks/job", 0, false, true)));
    let a = created_path(&apply_ok(
        &mut s,
        one(create_mode("/locks/job/l-", sid, true, false)),
    ));
    let b = created_path(&apply_ok(
        &mut s,
        one(create_mode("/locks/job/l-", sid, true, false)),
    ));
    apply_ok(&mut s, one(del(&a, false)));
    assert!(s.get("/locks/job").is_some(), "one child left");
    // Deleting the last child and creating a new one in the same txn keeps it.
    apply_ok(
        &mut s,
        Command::Txn(Txn {
            compares: vec![],
            success: vec![
                del(&b, false),
                create_mode("/locks/job/l-", sid, true, false),
            ],
            failure: vec![],
            request: None,
        }),
    );
    assert_eq!(s.get("/locks/job").map(|n| n.num_children), Some(1));
    // The session ends: its ephemeral goes, then the emptied containers, at
    // the same revision.
    let (applied, events) = s.apply(50, &Command::CloseSession { session_id: sid });
    assert_eq!(
        applied.result,
        Ok(AppliedResult::SessionsEnded {
            sessions: 1,
            deleted: 3
        })
    );
    assert!(s.get("/locks/job").is_none());
    assert!(s.get("/locks").is_none());
    let paths: Vec<_> = events.iter().map(|e| e.node.path.as_str()).collect();
    assert_eq!(paths.len(), 3);
    assert_eq!(&paths[1..], &["/locks/job", "/locks"]);
}

#[test]
fn a_retried_request_returns_the_first_result() {
    let mut s = State::default();
    let sid = open(&mut s, 1, 1000);
    apply_ok(&mut s, one(put("/q", "")));
    let req = |id: &str| {
        Command::Txn(Txn {
            compares: vec![],
            success: vec![create_mode("/q/item-", sid, true, false)],
            failure: vec![],
            request: Some(RequestId {
                session_id: sid,
                id: id.into(),
            }),
        })
    };
    let first = apply_ok(&mut s, req("r1"));
    let rev = s.revision();
    let again = apply_ok(&mut s, req("r1"));
    assert_eq!(first, again, "same node reported");
    assert_eq!(s.revision(), rev, "nothing applied twice");
    assert_eq!(s.get("/q").map(|n| n.num_children), Some(1));
    let other = apply_ok(&mut s, req("r2"));
    assert_ne!(created_path(&other), created_path(&first));
    // Without a session, ids live in a bounded global table.
    let global = |id: &str| {
        Command::Txn(Txn {
            compares: vec![],
            success: vec![create_mode("/q/g-", 0, true, false)],
            failure: vec![],
            request: Some(RequestId {
                session_id: 0,
                id: id.into(),
            }),
        })
    };
    let g1 = apply_ok(&mut s, global("x"));
    assert_eq!(apply_ok(&mut s, global("x")), g1);
    // A request id on an ended session is refused.
    s.apply(9, &Command::CloseSession { session_id: sid });
    assert_eq!(apply_err(&mut s, req("r1")).kind, ErrorKind::SessionExpired);
}

#[test]
fn checkpoints_never_exceed_the_ttl() {
    let mut s = State::default();
    let sid = open(&mut s, 3, 1000);
    s.apply(
        4,
        &Command::CheckpointSessions {
            remaining: vec![(sid, 400), (77, 5)],
        },
    );
    assert_eq!(s.session(sid).map(|x| x.remaining_ms), Some(400));
    s.apply(
        5,
        &Command::CheckpointSessions {
            remaining: vec![(sid, 5000)],
        },
    );
    assert_eq!(s.session(sid).map(|x| x.remaining_ms), Some(1000));
}

#[test]
fn sessions_and_counters_survive_a_snapshot_round_trip() {
    let mut s = State::default();
    let sid = open(&mut s, 1, 1000);
    apply_ok(&mut s, one(put("/d", "")));
    apply_ok(&mut s, one(create_mode("/d/n-", sid, true, false)));
    let bytes = postcard::to_stdvec(&s).expect("encode");
    let mut back: State = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(back, s);
    let o = apply_ok(&mut back, one(create_mode("/d/n-", sid, true, false)));
    assert_eq!(created_path(&o), "/d/n-0000000001");
    let (applied, _) = back.apply(9, &Command::CloseSession { session_id: sid });
    assert!(matches!(
        applied.result,
        Ok(AppliedResult::SessionsEnded { deleted: 2, .. })
    ));
}
