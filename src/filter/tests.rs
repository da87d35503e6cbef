use super::index::MatchIndex;
use super::*;
use serde_json::json;

fn record() -> Value {
    json!({
        "price": 150,
        "ratio": 0.5,
        "status": "published",
        "featured": false,
        "deleted_at": null,
        "tags": ["a", "b"],
        "author": {"name": "ann", "age": 41},
        "title": "Hello world"
    })
}

fn check(text: &str) -> bool {
    Filter::parse(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .matches(&record())
}

#[test]
fn every_operator_on_numbers() {
    assert!(check("price = 150"));
    assert!(check("price == 150.0"));
    assert!(!check("price = 151"));
    assert!(check("price != 151"));
    assert!(!check("price != 150"));
    assert!(check("price > 100"));
    assert!(!check("price > 150"));
    assert!(check("price >= 150"));
    assert!(check("price < 200"));
    assert!(!check("price < 150"));
    assert!(check("price <= 150"));
    assert!(check("price in (1, 150)"));
    assert!(!check("price not-in (1, 150)"));
    assert!(check("price not in (1, 2)"));
    assert!(check("ratio < 1"));
    assert!(check("price > -5.5e1"));
}

#[test]
fn every_operator_on_strings() {
    assert!(check(r#"status = "published""#));
    assert!(check("status = 'published'"));
    assert!(check("status=published"));
    assert!(check("status != draft"));
    assert!(check(r#"status > "a""#));
    assert!(!check(r#"status < "a""#));
    assert!(check(r#"status >= "published""#));
    assert!(check(r#"status <= "published""#));
    assert!(check(r#"status in ("draft", "published")"#));
    assert!(check(r#"status not-in ("draft")"#));
    assert!(check(r#"title contains "lo wo""#));
    assert!(!check(r#"title contains "xyz""#));
    assert!(check(r#"title starts-with "Hell""#));
    assert!(!check(r#"title starts-with "ello""#));
}

#[test]
fn booleans_null_arrays_and_exists() {
    assert!(check("featured = false"));
    assert!(!check("featured = true"));
    assert!(check("featured != true"));
    assert!(check("deleted_at = null"));
    assert!(!check("deleted_at exists"));
    assert!(check("price exists"));
    assert!(!check("missing exists"));
    assert!(check(r#"tags contains "a""#));
    assert!(!check(r#"tags contains "z""#));
    assert!(check("tags.1 = b"));
}

#[test]
fn type_mismatch_is_no_match() {
    // A number field against string literals and the other way round.
    assert!(!check(r#"price = "150""#));
    assert!(!check(r#"price != "150""#));
    assert!(!check(r#"price > "100""#));
    assert!(!check("status > 5"));
    assert!(!check("status = true"));
    assert!(!check(r#"price starts-with "1""#));
    assert!(!check(r#"price contains "1""#));
    assert!(!check(r#"author > "a""#));
    assert!(!check(r#"price not-in ("a", "b")"#));
    // Missing fields match nothing, negated or not.
    assert!(!check("missing = 1"));
    assert!(!check("missing != 1"));
    assert!(check("!(missing = 1)"));
}

#[test]
fn nested_fields_and_boolean_structure() {
    assert!(check(r#"author.name = "ann""#));
    assert!(check("author.age >= 41 && author.name = ann"));
    assert!(!check("author.name.first = ann"));
    assert!(check(
        r#"price > 100 && (status = "published" || featured = true)"#
    ));
    assert!(!check(
        r#"price > 100 && (status = "draft" || featured = true)"#
    ));
    assert!(check("not featured = true"));
    assert!(check("price > 1000 or status = published"));
    assert!(check("price > 1 AND status = published"));
    assert!(check("!(price < 1) && !!(price > 1)"));
}

#[test]
fn parse_errors_carry_column_and_reason() {
    let cases = [
        ("", 1, "empty"),
        ("price >", 8, "expected a value after '>'"),
        ("price 100", 7, "expected an operator"),
        ("(price > 1", 11, "expected ')'"),
        ("price > 1 status = a", 11, "expected '&&', '||'"),
        ("price > 1 & b = 2", 11, "must be doubled"),
        (r#"title = "open"#, 9, "not closed"),
        ("price in 1", 10, "expected '('"),
        ("price in ()", 11, "expected a value"),
        ("> 5", 1, "expected a field name"),
        ("a.. = 1", 1, "expected a field name"),
        ("a starts-with 5", 3, "takes a string"),
        ("a > true", 3, "takes a number or a string"),
        ("a = 1 #", 7, "unexpected character"),
    ];
    for (text, column, reason) in cases {
        match Filter::parse(text) {
            Err(FilterError::Parse(e)) => {
                assert_eq!(e.column, column, "{text:?}: {e}");
                assert!(e.reason.contains(reason), "{text:?}: {e}");
            }
            other => panic!("{text:?} gave {other:?}"),
        }
    }
}

#[test]
fn hostile_filters_are_refused_not_crashing() {
    let deep = format!("{}a = 1{}", "(".repeat(100), ")".repeat(100));
    assert!(Filter::parse(&deep).is_err());
    let bangs = format!("{}a = 1", "!".repeat(100));
    assert!(Filter::parse(&bangs).is_err());
    let wide = vec!["a = 1"; 300].join(" || ");
    assert!(Filter::parse(&wide).is_err());
    assert!(Filter::parse(&"a".repeat(MAX_TEXT + 1)).is_err());
}

#[test]
fn text_form_round_trips_through_display() {
    for text in [
        r#"price > 100 && (status = "published" || featured = true)"#,
        r#"tag in ("a", "b") && !(x exists) && name starts-with "a""#,
    ] {
        let filter = Filter::parse(text).unwrap();
        assert_eq!(Filter::parse(&filter.to_string()).unwrap(), filter);
    }
}

#[test]
fn json_shorthand() {
    let shorthand = |v: Value| Filter::from_shorthand(v.as_object().unwrap());
    assert!(
        shorthand(json!({"status": "published", "price": 150}))
            .unwrap()
            .matches(&record())
    );
    assert!(
        !shorthand(json!({"status": "published", "featured": true}))
            .unwrap()
            .matches(&record())
    );
    assert!(
        shorthand(json!({"author": {"name": "ann"}}))
            .unwrap()
            .matches(&record())
    );
    assert!(
        shorthand(json!({"status": ["draft", "published"]}))
            .unwrap()
            .matches(&record())
    );
    assert!(shorthand(json!({})).unwrap().matches(&record()));
    assert!(shorthand(json!({"status": []})).is_err());
    assert!(shorthand(json!({"status": [{"a": 1}]})).is_err());
}

/// Collects the candidate ids of `record`, sorted.
fn candidates(index: &MatchIndex<()>, record: &Value) -> Vec<u64> {
    let mut ids = Vec::new();
    index.candidates(record, |id, _| ids.push(id));
    ids.sort_unstable();
    ids
}

#[test]
fn index_never_misses_a_match() {
    let filters = [
        "status = published",
        "status = draft",
        "price in (150, 3)",
        "price > 100",
        "price >= 150",
        "price > 150",
        "price < 150",
        "price <= 150",
        "status > \"a\"",
        "status < \"a\"",
        "status != draft",
        "price > 100 || featured = true",
        "featured = false && price > 1",
        "author.name = ann",
        "deleted_at = null",
    ];
    let mut index = MatchIndex::default();
    let parsed: Vec<Filter> = filters.iter().map(|f| Filter::parse(f).unwrap()).collect();
    for (id, filter) in parsed.iter().enumerate() {
        index.insert(id as u64, Some(filter), ());
    }
    index.insert(100, None, ());
    for record in [
        record(),
        json!({"price": 3, "status": "draft"}),
        json!({"price": -0.0}),
        json!({}),
    ] {
        let found = candidates(&index, &record);
        for (id, filter) in parsed.iter().enumerate() {
            if filter.matches(&record) {
                assert!(
                    found.contains(&(id as u64)),
                    "{} missed on {record}",
                    filters[id]
                );
            }
        }
        assert!(found.contains(&100));
    }
    // The index narrows: an equality on another value is not a candidate.
    let found = candidates(&index, &json!({"status": "draft", "price": 3}));
    assert!(!found.contains(&0));
    assert!(found.contains(&1));
    assert!(!found.contains(&3), "price > 100 is not a candidate for 3");
}

#[test]
fn index_removal() {
    let mut index = MatchIndex::default();
    let eq = Filter::parse("k in (1, 2)").unwrap();
    let range = Filter::parse("k > 0").unwrap();
    index.insert(1, Some(&eq), ());
    index.insert(2, Some(&range), ());
    index.insert(3, None, ());
    assert_eq!(candidates(&index, &json!({"k": 2})), vec![1, 2, 3]);
    assert!(index.remove(1));
    assert!(!index.remove(1));
    assert!(index.remove(3));
    assert_eq!(candidates(&index, &json!({"k": 2})), vec![2]);
    assert!(index.remove(2));
    assert!(index.is_empty());
    assert_eq!(candidates(&index, &json!({"k": 2})), Vec::<u64>::new());
}

#[test]
fn parameters_bind_to_values() {
    let template = Filter::parse("owner_id = $sub && team in ($teams, \"ops\")").unwrap();
    let claims = json!({"sub": "alice", "teams": ["red", "blue"], "roles": ["a", "b"]});
    let lookup = |name: &str| claims.get(name).cloned();
    let bound = template.bind(&lookup).unwrap();
    assert!(bound.matches(&json!({"owner_id": "alice", "team": "blue"})));
    assert!(bound.matches(&json!({"owner_id": "alice", "team": "ops"})));
    assert!(!bound.matches(&json!({"owner_id": "bob", "team": "red"})));
    // A list claim under `=` means "one of".
    let roles = Filter::parse("role = $roles")
        .unwrap()
        .bind(&lookup)
        .unwrap();
    assert!(roles.matches(&json!({"role": "b"})));
    let missing = Filter::parse("x = $nope").unwrap().bind(&lookup);
    assert!(missing.unwrap_err().to_string().contains("$nope"));
    let wrong = Filter::parse("x > $roles").unwrap().bind(&lookup);
    assert!(wrong.is_err());
}
