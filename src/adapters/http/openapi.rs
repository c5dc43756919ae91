//! The error responses every operation can give, declared once for the whole document: the
//! handlers declare what is particular to them, this adds what follows from an operation's
//! shape (a key, a path id, a body, the database), so the document states every status a
//! client can meet and that each error is `application/problem+json`.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, ResponseBuilder};

use super::problem::{PROBLEM_JSON, ProblemKind};

/// Statuses and why, by what an operation has.
const AUTHENTICATED: &[(u16, &str)] = &[
    (
        400,
        "Both `Authorization` and `X-API-Key` sent, or a malformed header",
    ),
    (401, "No key, or one that is unknown, expired or revoked"),
    (
        403,
        "The key lacks the scope, or the client address is not allowed",
    ),
];
const PATH_ID: &[(u16, &str)] = &[
    (400, "A path parameter is malformed"),
    (404, "No such resource, or one this key may not see"),
];
const QUERY: &[(u16, &str)] = &[
    (400, "A query parameter is malformed"),
    (422, "A query parameter breaks a rule"),
];
const BODY: &[(u16, &str)] = &[
    (400, "The body is not valid JSON"),
    (413, "The body is larger than 1 MiB"),
    (415, "The body is not `application/json`"),
    (422, "The body is valid JSON but breaks a rule"),
];
const STORED: &[(u16, &str)] = &[(503, "The database is unavailable; retry later")];

/// Adds the problem responses each operation can give and marks every problem response as
/// `application/problem+json`.
pub fn declare_problem_responses(openapi: &mut OpenApi) {
    for (path, operation) in operations(openapi) {
        let stored = path.starts_with("/api/");
        let mut statuses: Vec<(u16, &str)> = Vec::new();
        if takes_a_key(operation) {
            statuses.extend(AUTHENTICATED);
        }
        let has_param =
            |operation: &Operation, place: ParameterIn| {
                operation.parameters.iter().flatten().any(|p| {
                    std::mem::discriminant(&p.parameter_in) == std::mem::discriminant(&place)
                })
            };
        if has_param(operation, ParameterIn::Path) {
            statuses.extend(PATH_ID);
        }
        if has_param(operation, ParameterIn::Query) {
            statuses.extend(QUERY);
        }
        if operation.request_body.is_some() {
            statuses.extend(BODY);
        }
        if stored {
            statuses.extend(STORED);
        }
        declare(operation, &statuses);
    }
}

/// Every operation of the document, with its path.
fn operations(openapi: &mut OpenApi) -> impl Iterator<Item = (&str, &mut Operation)> {
    openapi.paths.paths.iter_mut().flat_map(|(path, item)| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        .map(move |operation| (path.as_str(), operation))
    })
}

fn takes_a_key(operation: &Operation) -> bool {
    operation.security.as_ref().is_some_and(|s| !s.is_empty())
}

fn declare(operation: &mut Operation, statuses: &[(u16, &str)]) {
    let responses = &mut operation.responses.responses;
    for (status, description) in statuses {
        responses
            .entry(status.to_string())
            .or_insert_with(|| problem_response(description));
    }
    for response in responses.values_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        if let Some(content) = response.content.shift_remove("application/json") {
            if is_problem(&content) {
                response.content.insert(PROBLEM_JSON.to_owned(), content);
            } else {
                response
                    .content
                    .insert("application/json".to_owned(), content);
            }
        }
    }
}

fn problem_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(PROBLEM_JSON, Content::new(Some(problem_schema())))
            .build(),
    )
}

/// Lists every problem `type` the server answers with on the `Problem` schema, so that clients
/// tell errors apart by type instead of parsing their messages.
pub fn declare_problem_types(openapi: &mut OpenApi) {
    use utoipa::openapi::schema::Schema;
    let Some(RefOr::T(Schema::Object(problem))) = openapi
        .components
        .as_mut()
        .and_then(|components| components.schemas.get_mut("Problem"))
    else {
        return;
    };
    let Some(RefOr::T(Schema::Object(kind))) = problem.properties.get_mut("type") else {
        return;
    };
    let mut types: Vec<serde_json::Value> = ProblemKind::ALL
        .iter()
        .map(|kind| kind.uri().into())
        .collect();
    // A status a layer answered without a body, and no kind of its own.
    types.push("urn:rdev:problem:http-error".into());
    kind.enum_values = Some(types);
}

fn problem_schema() -> RefOr<utoipa::openapi::schema::Schema> {
    RefOr::Ref(Ref::from_schema_name("Problem"))
}

fn is_problem(content: &Content) -> bool {
    matches!(&content.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"))
}

/// Every operation that takes a key is rate limited: its responses carry the `RateLimit-*`
/// headers, and it can answer 429 with `Retry-After` (the key's limit, or too many failed
/// authentications from the client's address).
pub fn declare_rate_limits(openapi: &mut OpenApi) {
    use utoipa::openapi::Type;
    use utoipa::openapi::header::{Header, HeaderBuilder};
    use utoipa::openapi::schema::ObjectBuilder;

    let header = |kind: Type, description: &str| -> Header {
        HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(kind))
            .description(Some(description))
            .build()
    };
    let rate_headers = [
        (
            "RateLimit-Limit",
            header(
                Type::Integer,
                "Requests the key may make in any sliding window.",
            ),
        ),
        (
            "RateLimit-Remaining",
            header(
                Type::Integer,
                "Requests left in the sliding window ending now.",
            ),
        ),
        (
            "RateLimit-Reset",
            header(
                Type::Integer,
                "Seconds until every request counted so far has left the window.",
            ),
        ),
        (
            "RateLimit-Policy",
            header(
                Type::String,
                "The key's quota: `<limit>;w=<window in seconds>`.",
            ),
        ),
    ];
    let too_many = ResponseBuilder::new()
        .description(
            "The key's rate limit is reached, or this address failed to authenticate too often \
             (then without the `RateLimit-*` headers)",
        )
        .header(
            "Retry-After",
            header(Type::Integer, "Seconds until a request would be admitted."),
        )
        .content(PROBLEM_JSON, Content::new(Some(problem_schema())))
        .build();
    for (_, operation) in operations(openapi) {
        if !takes_a_key(operation) {
            continue;
        }
        let responses = &mut operation.responses.responses;
        responses.insert("429".to_owned(), RefOr::T(too_many.clone()));
        for response in responses.values_mut() {
            if let RefOr::T(response) = response {
                for (name, header) in &rate_headers {
                    response.headers.insert((*name).to_owned(), header.clone());
                }
            }
        }
    }
}
