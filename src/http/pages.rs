//! Server-rendered pages: the landing page (waitlist, invite registration, sign-in), the pages
//! that e-mail links open, and the static files they use. Templates live in static/pages and are
//! compiled into the binary; minijinja escapes every value.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use minijinja::{context, Environment};

use super::auth::session_token;
use super::waitlist::TokenQuery;
use super::AppState;
use crate::db::accounts;
use crate::db::waitlist::{self, WaitState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/c/{id}", get(home))
        .route("/register", get(landing))
        .route("/reset", get(reset_page))
        .route("/admin", get(admin_page))
        .route("/waitlist/confirm", get(confirm_page))
        .route("/waitlist/status", get(status_page))
        .route(
            "/static/highlight.css",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                        (header::CACHE_CONTROL, "public, max-age=300"),
                    ],
                    crate::render::highlight_css(),
                )
                    .into_response()
            }),
        )
        .route("/static/{*path}", get(asset))
}

/// The UI's files, compiled into the binary (no CDN, no build step).
#[derive(rust_embed::RustEmbed)]
#[folder = "static/"]
struct Assets;

async fn asset(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    let Some(file) = Assets::get(&path) else {
        return message(
            StatusCode::NOT_FOUND,
            "Not found",
            "页面不存在",
            "There is no such file.",
            "没有这个文件。",
        );
    };
    let content_type = match path.rsplit('.').next() {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("webmanifest") => "application/manifest+json",
        _ => "application/octet-stream",
    };
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "public, max-age=300"),
    ];
    (headers, file.data.into_owned()).into_response()
}

fn env() -> &'static Environment<'static> {
    static ENV: std::sync::OnceLock<Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        for (name, src) in [
            ("base.html", include_str!("../../static/pages/base.html")),
            (
                "landing.html",
                include_str!("../../static/pages/landing.html"),
            ),
            ("home.html", include_str!("../../static/pages/home.html")),
            (
                "message.html",
                include_str!("../../static/pages/message.html"),
            ),
            ("reset.html", include_str!("../../static/pages/reset.html")),
            ("admin.html", include_str!("../../static/pages/admin.html")),
        ] {
            env.add_template(name, src).expect("page templates compile");
        }
        env
    })
}

/// Renders a page; a template error is a logged 500 with a plain message.
pub fn page(status: StatusCode, name: &str, ctx: minijinja::Value) -> Response {
    match env().get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!("page {name}: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

async fn signed_in(
    state: &AppState,
    headers: &axum::http::request::Parts,
) -> Option<accounts::User> {
    let token = session_token(state, headers)?;
    accounts::session_user(&state.db, &token, state.session_idle_ms())
        .await
        .ok()
        .flatten()
}

async fn home(State(state): State<AppState>, req: axum::extract::Request) -> Response {
    let (parts, _) = req.into_parts();
    match signed_in(&state, &parts).await {
        Some(user) => page(
            StatusCode::OK,
            "home.html",
            context! { user => minijinja::Value::from(minijinja::value::Serde(&user)) },
        ),
        None => landing().await,
    }
}

async fn landing() -> Response {
    page(StatusCode::OK, "landing.html", context! {})
}

async fn reset_page() -> Response {
    page(StatusCode::OK, "reset.html", context! {})
}

async fn admin_page(State(state): State<AppState>, req: axum::extract::Request) -> Response {
    let (parts, _) = req.into_parts();
    match signed_in(&state, &parts).await {
        Some(user) if user.is_admin() => page(
            StatusCode::OK,
            "admin.html",
            context! { user => minijinja::Value::from(minijinja::value::Serde(&user)) },
        ),
        Some(_) => message(
            StatusCode::FORBIDDEN,
            "Admins only",
            "管理员专用",
            "This page is for operators.",
            "此页面仅供管理员使用。",
        ),
        None => message(
            StatusCode::UNAUTHORIZED,
            "Please sign in",
            "请先登录",
            "Sign in with an admin account first.",
            "请先用管理员账号登录。",
        ),
    }
}

fn message(status: StatusCode, title: &str, title_zh: &str, text: &str, text_zh: &str) -> Response {
    page(
        status,
        "message.html",
        context! { title, title_zh, text, text_zh },
    )
}

async fn confirm_page(State(state): State<AppState>, Query(q): Query<TokenQuery>) -> Response {
    use waitlist::Confirmation;
    let token = q.token.unwrap_or_default();
    let valid_ms = state.config.waitlist.confirm_link_hours * 3_600_000;
    match waitlist::confirm(&state.db, &token, valid_ms).await {
        Ok(Confirmation::Confirmed | Confirmation::Already) => {
            status_page(State(state), Query(TokenQuery { token: Some(token) })).await
        }
        Ok(Confirmation::Expired) => message(
            StatusCode::GONE,
            "Link expired",
            "链接已过期",
            "This confirmation link has expired. Sign up again with the same address to get a new one.",
            "此确认链接已过期。请用同一邮箱重新登记，以获取新的链接。",
        ),
        Ok(Confirmation::Unknown) => message(
            StatusCode::NOT_FOUND,
            "Unknown link",
            "链接无效",
            "This confirmation link is not valid.",
            "此确认链接无效。",
        ),
        Err(_) => message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again",
            "请重试",
            "Please try again in a moment.",
            "请稍后重试。",
        ),
    }
}

async fn status_page(State(state): State<AppState>, Query(q): Query<TokenQuery>) -> Response {
    let token = q.token.unwrap_or_default();
    match waitlist::status(&state.db, &token).await {
        Ok(Some(s)) => {
            let (text, text_zh) = match s.state {
                WaitState::Unconfirmed => (
                    "Please confirm your address with the link in our e-mail.".to_string(),
                    "请用邮件中的链接确认你的邮箱。".to_string(),
                ),
                WaitState::Waiting => {
                    let position = s.position.unwrap_or(0);
                    let (eta, eta_zh) =
                        match crate::autoadmit::eta_secs(&state.config.waitlist.auto, position) {
                            Some(secs) => {
                                let (en, zh) = crate::autoadmit::in_words(secs);
                                (
                                    format!(" At the current pace your turn may come in {en}."),
                                    format!("按目前的节奏，大约{zh}后轮到你。"),
                                )
                            }
                            None => (String::new(), String::new()),
                        };
                    let (then, then_zh) = match state.mail_enabled() {
                        true => (
                            " We will e-mail your invite code.",
                            "轮到你时我们会把邀请码发到你的邮箱。",
                        ),
                        false => (
                            " The operator will hand you your invitation link.",
                            "轮到你时管理员会把邀请链接交给你。",
                        ),
                    };
                    (
                        format!("You are number {position} in line; {} people are ahead of you.{eta}{then}", s.ahead.unwrap_or(0)),
                        format!("你排在第 {position} 位，前面还有 {} 人。{eta_zh}{then_zh}", s.ahead.unwrap_or(0)),
                    )
                }
                WaitState::Invited if state.mail_enabled() => (
                    "You are invited! Your code is in your inbox.".to_string(),
                    "你已获得邀请！邀请码已发送到你的邮箱。".to_string(),
                ),
                WaitState::Invited => (
                    "You are invited! The operator will hand you your invitation link.".to_string(),
                    "你已获得邀请！管理员会把邀请链接交给你。".to_string(),
                ),
                WaitState::Registered => (
                    "You have registered. Welcome!".to_string(),
                    "你已完成注册，欢迎！".to_string(),
                ),
            };
            message(
                StatusCode::OK,
                "Your place on the waitlist",
                "你的候补状态",
                &text,
                &text_zh,
            )
        }
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            "Unknown link",
            "链接无效",
            "This status link is not valid.",
            "此状态链接无效。",
        ),
        Err(_) => message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again",
            "请重试",
            "Please try again in a moment.",
            "请稍后重试。",
        ),
    }
}
