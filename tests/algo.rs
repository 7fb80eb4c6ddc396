//! The `--sparse-algo` grammar (`SparseAlgo`), `BlockGrid` parsing and `BlockGrid::from_tokens`.
//! Pure CPU: no GPU needed.

use nabla::{BlockGrid, Error, SparseAlgo, StaWindow};

fn parse(s: &str) -> SparseAlgo {
    s.parse::<SparseAlgo>()
        .unwrap_or_else(|e| panic!("{s:?} must parse: {e}"))
}

fn win(t: u32, h: u32, w: u32) -> StaWindow {
    StaWindow { t, h, w }
}

#[test]
fn accepted_forms_have_the_right_fields() {
    let cases: [(&str, SparseAlgo); 8] = [
        ("nabla-0.7", SparseAlgo::Nabla { thr: 0.7 }),
        ("nabla-0", SparseAlgo::Nabla { thr: 0.0 }),
        ("nabla-1", SparseAlgo::Nabla { thr: 1.0 }),
        ("nabla-1.0", SparseAlgo::Nabla { thr: 1.0 }),
        ("nabla-0.5", SparseAlgo::Nabla { thr: 0.5 }),
        ("sta-11-3-3", SparseAlgo::Sta(win(11, 3, 3))),
        ("sta-1-1-1", SparseAlgo::Sta(win(1, 1, 1))),
        (
            "nabla-0.6_sta-11-3-3",
            SparseAlgo::NablaSta {
                thr: 0.6,
                window: win(11, 3, 3),
            },
        ),
    ];
    for (s, want) in cases {
        assert_eq!(parse(s), want, "{s}");
    }
}

#[test]
fn unusual_but_valid_numbers() {
    // Python's float()/int(), which the reference fork uses, accept these too (spec §4.8).
    assert_eq!(parse("nabla-.5"), SparseAlgo::Nabla { thr: 0.5 });
    assert_eq!(parse("nabla-1."), SparseAlgo::Nabla { thr: 1.0 });
    assert_eq!(parse("nabla-00.70"), SparseAlgo::Nabla { thr: 0.7 });
    assert_eq!(parse("sta-011-03-3"), SparseAlgo::Sta(win(11, 3, 3)));
    // even windows are kept as given (they act like the next odd one)
    assert_eq!(parse("sta-10-2-2"), SparseAlgo::Sta(win(10, 2, 2)));
}

#[test]
fn accessors() {
    let n = parse("nabla-0.7");
    assert_eq!(n.threshold(), Some(0.7));
    assert_eq!(n.sta(), None);

    let s = parse("sta-11-3-3");
    assert_eq!(s.threshold(), None);
    assert_eq!(s.sta(), Some(win(11, 3, 3)));
    assert_eq!(s.cut(), None);
    assert_eq!(win(11, 3, 3).radii(), [5, 1, 1]);
    // an even window behaves like the next odd one
    assert_eq!(win(10, 4, 2).radii(), [5, 2, 1]);

    let c = parse("nabla-0.6_sta-11-3-3");
    assert_eq!(c.threshold(), Some(0.6));
    assert_eq!(c.sta(), Some(win(11, 3, 3)));
}

#[test]
fn cut_is_f32_of_one_minus_thr() {
    for s in [
        "nabla-0.7",
        "nabla-0",
        "nabla-1",
        "nabla-0.6_sta-11-3-3",
        "nabla-0.9",
        "nabla-0.33",
    ] {
        let a = parse(s);
        let thr = a.threshold().expect("nabla");
        let cut = a.cut().expect("nabla has a cut");
        // computed in f64, then rounded once to f32, as the reference compares it
        assert_eq!(cut.to_bits(), ((1.0f64 - thr) as f32).to_bits(), "{s}");
    }
    assert_eq!(parse("nabla-0.7").cut(), Some((1.0f64 - 0.7) as f32));
    assert_eq!(parse("nabla-0").cut(), Some(1.0));
    assert_eq!(parse("nabla-1").cut(), Some(0.0));
}

#[test]
fn display_round_trips() {
    for s in [
        "nabla-0.7",
        "nabla-0",
        "nabla-1",
        "nabla-1.0",
        "nabla-0.25",
        "sta-11-3-3",
        "sta-1-2-3",
        "nabla-0.6_sta-11-3-3",
    ] {
        let a = parse(s);
        let shown = a.to_string();
        assert_eq!(parse(&shown), a, "{s} -> {shown}");
        // the canonical form is stable
        assert_eq!(parse(&shown).to_string(), shown, "{s}");
    }
    assert_eq!(parse("nabla-0.7").to_string(), "nabla-0.7");
    assert_eq!(parse("sta-11-3-3").to_string(), "sta-11-3-3");
    assert_eq!(
        parse("nabla-0.6_sta-11-3-3").to_string(),
        "nabla-0.6_sta-11-3-3"
    );
}

#[test]
fn sparse_at_step_sta_only_is_dense_for_the_first_12_steps() {
    let sta = parse("sta-11-3-3");
    for step in 0..12 {
        assert!(!sta.sparse_at_step(step), "STA step {step} must be dense");
    }
    for step in [12, 13, 49, 1000] {
        assert!(sta.sparse_at_step(step), "STA step {step} must be sparse");
    }
    for s in ["nabla-0.7", "nabla-0.6_sta-11-3-3"] {
        let a = parse(s);
        for step in [0, 1, 11, 12, 49] {
            assert!(a.sparse_at_step(step), "{s} step {step} must be sparse");
        }
    }
}

#[test]
fn parse_optional() {
    assert_eq!(SparseAlgo::parse_optional("none").unwrap(), None);
    assert_eq!(SparseAlgo::parse_optional("").unwrap(), None);
    assert_eq!(
        SparseAlgo::parse_optional("nabla-0.7").unwrap(),
        Some(SparseAlgo::Nabla { thr: 0.7 })
    );
    assert_eq!(
        SparseAlgo::parse_optional("sta-11-3-3").unwrap(),
        Some(SparseAlgo::Sta(win(11, 3, 3)))
    );
    let e = SparseAlgo::parse_optional("nabla-1.5").unwrap_err();
    assert!(matches!(e, Error::SparseAlgo { .. }), "{e:?}");
    let e = SparseAlgo::parse_optional("foo").unwrap_err();
    assert!(e.to_string().contains("Accepted forms"), "{e}");
}

/// The message names the input and every accepted form, so a user can fix it.
fn assert_rejected(s: &str) {
    let e = match s.parse::<SparseAlgo>() {
        Ok(a) => panic!("{s:?} must be rejected, parsed as {a:?}"),
        Err(e) => e,
    };
    let Error::SparseAlgo { input, reason } = &e else {
        panic!("{s:?}: expected Error::SparseAlgo, got {e:?}");
    };
    assert_eq!(input, s);
    assert!(!reason.is_empty(), "{s:?}: empty reason");
    let msg = e.to_string();
    for needle in [
        "nabla-<thr>",
        "sta-<wT>-<wH>-<wW>",
        "nabla-<thr>_sta-<wT>-<wH>-<wW>",
        "none",
        &format!("{s:?}"),
    ] {
        assert!(
            msg.contains(needle),
            "{s:?}: message lacks {needle:?}: {msg}"
        );
    }
}

#[test]
fn rejected_forms() {
    for s in [
        "",
        "nabla",
        "nabla-",
        "nabla-1.5",
        "nabla--0.1",
        "nabla-nan",
        "nabla-NaN",
        "nabla-inf",
        "nabla-0.7x",
        "nabla-0.7.1",
        "nabla-1e-1",
        "nabla- 0.7",
        "NABLA-0.7",
        "sta",
        "sta-11-3",
        "sta-11-3-3-3",
        "sta-0-3-3",
        "sta-11-0-3",
        "sta-11-3-0",
        "sta--1-3-3",
        "sta-a-3-3",
        "sta-11-3-",
        "sta-1.5-3-3",
        "sta-99999999999-3-3",
        "nabla-0.6_sta-11-3-3_x",
        "nabla-0.6_",
        "_sta-11-3-3",
        "nabla-0.6_sta-11-3",
        "nabla-1.5_sta-11-3-3",
        "foo-0.7",
        "sta-11-3-3_nabla-0.6",
        "nabla-0.6_nabla-0.7",
        "sta-11-3-3_sta-11-3-3",
        "none",
        "dense",
    ] {
        assert_rejected(s);
    }
}

#[test]
fn reasons_are_specific() {
    let reason = |s: &str| match s.parse::<SparseAlgo>() {
        Err(Error::SparseAlgo { reason, .. }) => reason,
        other => panic!("{s:?}: {other:?}"),
    };
    assert!(reason("nabla-1.5").contains("outside [0, 1]"));
    assert!(reason("nabla-inf").contains("not a decimal number"));
    assert!(reason("sta-11-3").contains("three windows"));
    assert!(reason("sta-0-3-3").contains("positive"));
    assert!(reason("nabla-0.6_sta-11-3-3_x").contains("more than one `_`"));
    assert!(reason("sta-11-3-3_nabla-0.6").contains("nabla-"));
}

#[test]
fn block_grid_parsing() {
    let g: BlockGrid = "3,2,2".parse().unwrap();
    assert_eq!(g, BlockGrid::new(3, 2, 2).unwrap());
    assert_eq!((g.t, g.hb, g.wb), (3, 2, 2));
    assert_eq!(g.blocks(), 12);
    assert_eq!(g.tokens(), 12 * 64);
    assert_eq!(" 3, 2 ,2".parse::<BlockGrid>().unwrap(), g);

    for (s, needle) in [
        ("3,2", "three integers"),
        ("3,2,2,2", "three integers"),
        ("a,b,c", "not three integers"),
        ("", "three integers"),
        ("3,-2,2", "not three integers"),
        ("0,1,1", "zero side"),
        ("1,0,1", "zero side"),
        ("1,1,0", "zero side"),
    ] {
        match s.parse::<BlockGrid>() {
            Ok(g) => panic!("{s:?} must be rejected, parsed as {g:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "{s:?}: {msg:?} lacks {needle:?}");
            }
        }
    }
    assert!(BlockGrid::new(0, 1, 1).is_err());
}

#[test]
fn block_grid_from_tokens() {
    let g = BlockGrid::from_tokens(21, 40, 80).unwrap();
    assert_eq!((g.t, g.hb, g.wb), (21, 5, 10));
    assert_eq!(BlockGrid::from_tokens(1, 8, 8).unwrap().blocks(), 1);
    assert_eq!(g.coords(0), (0, 0, 0));
    assert_eq!(g.coords(g.blocks() - 1), (20, 4, 9));

    for (f, h, w) in [(1, 12, 8), (1, 8, 12), (1, 7, 7), (1, 0, 8), (1, 8, 0)] {
        match BlockGrid::from_tokens(f, h, w) {
            Ok(g) => panic!("{f}x{h}x{w} must be rejected, got {g:?}"),
            Err(e) => {
                assert!(matches!(e, Error::Shape(_)), "{e:?}");
                let msg = e.to_string();
                assert!(
                    msg.contains("multiples of 8") && msg.contains(&format!("{f}x{h}x{w}")),
                    "{msg}"
                );
            }
        }
    }
    // zero frames: H and W are fine, the grid itself has a zero side
    let e = BlockGrid::from_tokens(0, 8, 8).unwrap_err();
    assert!(e.to_string().contains("zero side"), "{e}");
}
