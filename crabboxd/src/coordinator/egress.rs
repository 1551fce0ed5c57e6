//! The egress routes of the coordinator (protocol doc §3.2–§3.6): tickets,
//! status, and dialling a bridge WebSocket with the ticket in a header —
//! never in the URL.

use serde::{Deserialize, Serialize};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::client::{Client, CoordinatorError, encode};
use crate::config::Secret;

/// A bridge WebSocket to the coordinator.
pub type Bridge = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Which end of a bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The operator end (this daemon).
    Host,
    /// The lease end (`crabbox-egress-client`).
    Client,
}

impl Role {
    /// `host` or `client`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Client => "client",
        }
    }
}

/// What a ticket request asks for.
#[derive(Debug, Clone, Default)]
pub struct TicketRequest<'a> {
    /// The session to (re)join; `None` lets the coordinator mint one.
    pub session: Option<&'a str>,
    /// The profile name(s), for the coordinator's status display.
    pub profile: Option<&'a str>,
    /// The allowlist, for the coordinator's status display.
    pub allow: &'a [String],
}

/// A one-use, 120 s bridge ticket.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The ticket (`egress_` + 32 hex). A secret: it authorises one upgrade.
    pub ticket: Secret,
    /// The session it belongs to.
    pub session_id: String,
    /// The lease id.
    pub lease_id: String,
    /// When it expires, ISO-8601.
    pub expires_at: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TicketReply {
    ticket: Secret,
    #[serde(rename = "leaseID")]
    lease_id: String,
    #[serde(rename = "sessionID")]
    session_id: String,
    #[serde(default)]
    expires_at: String,
}

/// `GET …/egress/status`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressStatus {
    /// The lease id.
    #[serde(rename = "leaseID")]
    pub lease_id: String,
    /// Whether an egress session is active.
    pub active: bool,
    /// The active session (empty without manage access).
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// Its profile.
    pub profile: String,
    /// Its allowlist.
    pub allow: Vec<String>,
    /// Whether a host socket is connected (absent without manage access).
    pub host_connected: Option<bool>,
    /// Whether a client socket is connected.
    pub client_connected: Option<bool>,
}

impl Client {
    /// `POST /v1/leases/{id}/egress/ticket`. Minting for a new session id
    /// activates it and replaces the current session (§3.3); minting for the
    /// current session is a harmless reconnect.
    pub async fn egress_ticket(
        &self,
        lease: &str,
        role: Role,
        req: TicketRequest<'_>,
    ) -> Result<Ticket, CoordinatorError> {
        #[derive(Serialize)]
        struct Body<'a> {
            role: &'a str,
            #[serde(rename = "sessionID", skip_serializing_if = "Option::is_none")]
            session_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            profile: Option<&'a str>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            allow: &'a [String],
        }
        let path = format!("/v1/leases/{}/egress/ticket", encode(lease));
        let body = Body {
            role: role.as_str(),
            session_id: req.session,
            profile: req.profile.filter(|p| !p.is_empty()),
            allow: req.allow,
        };
        let reply: TicketReply = self.send("POST", &path, Some(&body)).await?;
        Ok(Ticket {
            ticket: reply.ticket,
            session_id: reply.session_id,
            lease_id: reply.lease_id,
            expires_at: reply.expires_at,
        })
    }

    /// `GET /v1/leases/{id}/egress/status`.
    pub async fn egress_status(&self, lease: &str) -> Result<EgressStatus, CoordinatorError> {
        let path = format!("/v1/leases/{}/egress/status", encode(lease));
        self.send("GET", &path, None::<&()>).await
    }

    /// Prepares the dial of a bridge WebSocket for `role`, authorised by
    /// `ticket` in the `X-Crabbox-Bridge-Ticket` header (with the
    /// coordinator token as bearer, as the reference CLI sends it): the URL
    /// and the bearer (which may run the token command) here, the socket in
    /// [`BridgeDial::dial`], on whichever runtime is to drive it.
    pub async fn bridge_dial(
        &self,
        lease: &str,
        role: Role,
        ticket: &Secret,
    ) -> Result<BridgeDial, CoordinatorError> {
        let path = format!("/v1/leases/{}/egress/{}", encode(lease), role.as_str());
        let mut url = self.base().clone();
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .expect("ws and wss are valid schemes");
        let url = format!("{}{}", url.as_str().trim_end_matches('/'), path);
        Ok(BridgeDial {
            url,
            path,
            ticket: ticket.clone(),
            bearer: self.bearer().await?,
        })
    }
}

/// A bridge WebSocket ready to be dialled ([`Client::bridge_dial`]).
pub struct BridgeDial {
    url: String,
    path: String,
    ticket: Secret,
    bearer: Option<Secret>,
}

impl BridgeDial {
    /// Opens the socket. On a 401/403 handshake it retries once with the
    /// ticket as the bearer, for older coordinators.
    pub async fn dial(self) -> Result<Bridge, CoordinatorError> {
        let BridgeDial {
            url,
            path,
            ticket,
            bearer,
        } = self;
        // The one dialler both bridge ends share (crabbox-egress); only the
        // mapping into this module's error shape lives here.
        crabbox_egress::connect_bridge(&url, ticket.expose(), bearer.as_ref().map(|b| b.expose()))
            .await
            .map_err(|e| match e.status() {
                Some(status) => CoordinatorError::Status {
                    method: "GET",
                    path: path.clone(),
                    status,
                    code: format!("http_{status}"),
                    message: Some("bridge upgrade refused".into()),
                },
                None => CoordinatorError::Bridge {
                    path: path.clone(),
                    message: e.to_string(),
                },
            })
    }
}
