//! Who is asking: the session cookie (server-side sessions, any replica can check them), the
//! signed-in user and admin extractors, and the cross-site write check for cookie-authenticated
//! requests (Sec-Fetch-Site / Origin).

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};

use super::error::AppError;
use super::AppState;
use crate::db::accounts::{self, User};

/// The session cookie's name: `__Host-` prefixed when served over https.
pub fn cookie_name(state: &AppState) -> &'static str {
    if state.secure_cookies() {
        "__Host-moss_session"
    } else {
        "moss_session"
    }
}

/// A cookie carrying a new session id.
pub fn session_cookie(state: &AppState, token: String) -> Cookie<'static> {
    let max_age = state.config.accounts.session_absolute_days as i64 * 86_400;
    Cookie::build((cookie_name(state), token))
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(state.secure_cookies())
        .path("/")
        .max_age(time_duration(max_age))
        .build()
}

/// A cookie that removes the session cookie.
pub fn cleared_cookie(state: &AppState) -> Cookie<'static> {
    Cookie::build((cookie_name(state), ""))
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(state.secure_cookies())
        .path("/")
        .max_age(time_duration(0))
        .build()
}

fn time_duration(secs: i64) -> time::Duration {
    time::Duration::seconds(secs)
}

/// The session token from the request's cookies, if any.
pub fn session_token(state: &AppState, parts: &Parts) -> Option<String> {
    CookieJar::from_headers(&parts.headers)
        .get(cookie_name(state))
        .map(|c| c.value().to_string())
}

/// The signed-in user; `401 unauthenticated` otherwise.
pub struct CurrentUser(pub User);

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        if let Some(user) = parts.extensions.get::<User>() {
            return Ok(CurrentUser(user.clone()));
        }
        let token = session_token(state, parts).ok_or(AppError::Unauthenticated)?;
        let user = accounts::session_user(&state.db, &token, state.session_idle_ms())
            .await?
            .ok_or(AppError::Unauthenticated)?;
        parts.extensions.insert(user.clone());
        Ok(CurrentUser(user))
    }
}

/// A signed-in admin; `403 forbidden` for other users.
pub struct AdminUser(pub User);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let CurrentUser(user) = CurrentUser::from_request_parts(parts, state).await?;
        if user.is_admin() {
            Ok(AdminUser(user))
        } else {
            Err(AppError::Forbidden)
        }
    }
}

/// Refuses state-changing requests that a browser marks as coming from another site: a
/// `Sec-Fetch-Site` other than `same-origin` (or `none`, a typed address), or an `Origin` that is
/// not exactly this service's — scheme, host and port of `server.public_url`, or of
/// `http://<Host>` when none is configured (`null`, another scheme or port all differ). Requests
/// without these headers (curl, API clients with bearer keys) carry no ambient cookie authority
/// from a foreign page, so they pass.
pub async fn refuse_cross_site(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let site_ok =
        header("sec-fetch-site").is_none_or(|site| matches!(site, "same-origin" | "none"));
    let origin_ok = header(header::ORIGIN.as_str()).is_none_or(|origin| {
        let ours = match state.config.server.public_url.as_str() {
            "" => header(header::HOST.as_str()).map(|host| format!("http://{host}")),
            public => Some(public.to_string()),
        };
        same_origin(origin, ours.as_deref())
    });
    if site_ok && origin_ok {
        next.run(req).await
    } else {
        AppError::CrossSite.into_response()
    }
}

/// True when `origin` (a request's `Origin` header) has the scheme, host and port of `ours`.
fn same_origin(origin: &str, ours: Option<&str>) -> bool {
    let parse = |u: &str| reqwest::Url::parse(u).ok().map(|u| u.origin());
    match (parse(origin), ours.and_then(parse)) {
        // An opaque origin (`null`, `file:`, `data:`) is never ours.
        (Some(theirs), Some(ours)) => theirs.is_tuple() && theirs == ours,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::same_origin;

    #[test]
    fn origins_match_by_scheme_host_and_port() {
        let ours = Some("http://chat.example.org:8080");
        assert!(same_origin("http://chat.example.org:8080", ours));
        assert!(same_origin("http://CHAT.example.org:8080", ours));
        for other in [
            "https://chat.example.org:8080",
            "ftp://chat.example.org:8080",
            "http://chat.example.org",
            "http://chat.example.org:8081",
            "http://evil.example.org:8080",
            "null",
            "",
        ] {
            assert!(!same_origin(other, ours), "{other}");
        }
        // Default ports are the same origin written two ways.
        assert!(same_origin(
            "https://chat.example.org",
            Some("https://chat.example.org:443/")
        ));
        assert!(!same_origin("http://chat.example.org:8080", None));
    }
}
