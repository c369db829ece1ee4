//! `allowed_origins` at run time (SPEC §10 point 8): the list in force for CORS and WebSocket
//! upgrades — the configuration's until an admin sets one with `PUT /admin/origins`, which is
//! kept in storage (it then wins over the configuration, at start too), applied here (live
//! connections whose origin is no longer allowed close with 4503) and announced to the other
//! nodes, which read it from storage and apply it the same way.

use std::sync::{Arc, OnceLock, RwLock};

use engine::{HttpResponse, Identity};
use serde::Serialize;
use storage::Store;

use crate::announce::Announcement;
use crate::api_error::{Answer, ApiError};
use crate::clock::now_ms;
use crate::rooms::RoomDirectory;

/// The setting's name in storage.
const SETTING: &str = "allowed_origins";
/// The longest list accepted.
const MAX_ORIGINS: usize = 256;

/// The origins in force on this node.
pub struct Origins {
    list: RwLock<Arc<[String]>>,
    store: Arc<dyn Store>,
    directory: Arc<RoomDirectory>,
    control: OnceLock<engine::Control>,
}

impl std::fmt::Debug for Origins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origins")
            .field("list", &self.list())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Body<'a> {
    origins: &'a [String],
}

impl Origins {
    /// The configuration's list, until [`Origins::reload`] finds one in storage.
    pub fn new(
        configured: Vec<String>,
        store: Arc<dyn Store>,
        directory: Arc<RoomDirectory>,
    ) -> Self {
        Self {
            list: RwLock::new(Arc::from(configured)),
            store,
            directory,
            control: OnceLock::new(),
        }
    }

    /// Connects the running engine and applies a list kept in storage, if any.
    pub fn attach(&self, control: engine::Control) {
        let _ = self.control.set(control);
        self.reload();
    }

    /// The list in force.
    pub fn list(&self) -> Arc<[String]> {
        self.list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether `origin` may call (an empty list allows any).
    pub fn allows(&self, origin: &str) -> bool {
        let list = self.list();
        list.is_empty() || list.iter().any(|o| o == origin)
    }

    /// Whether the operator named origins (credentials are allowed only then).
    pub fn named(&self) -> bool {
        !self.list().is_empty()
    }

    /// Reads the list kept in storage (another node changed it, or at start) and applies it.
    pub fn reload(&self) {
        match self.store.setting(SETTING) {
            Ok(Some(text)) => match sonic_rs::from_str::<Vec<String>>(&text) {
                Ok(list) => self.apply(list),
                Err(e) => tracing::warn!(error = %e, "the stored allowed_origins is unreadable"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read allowed_origins"),
        }
    }

    fn apply(&self, list: Vec<String>) {
        *self
            .list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::from(list.clone());
        if let Some(control) = self.control.get() {
            control.set_allowed_origins(list);
        }
    }

    fn admin_only(&self, who: &Identity) -> Result<(), ApiError> {
        if self.directory.is_admin(&who.user_id) {
            Ok(())
        } else {
            Err(ApiError::forbidden())
        }
    }

    /// `GET /admin/origins`.
    pub fn get(&self, who: &Identity) -> Answer {
        self.admin_only(who)?;
        let list = self.list();
        Ok(HttpResponse::json(
            200,
            sonic_rs::to_vec(&Body { origins: &list }).unwrap_or_default(),
        ))
    }

    /// `PUT /admin/origins`: validated, kept, applied here, announced.
    pub fn put(&self, who: &Identity, list: Vec<String>) -> Answer {
        self.admin_only(who)?;
        if list.len() > MAX_ORIGINS {
            return Err(ApiError::invalid_input("origins", "at most 256 origins"));
        }
        if list.iter().any(|o| !crate::config::validate::is_origin(o)) {
            return Err(ApiError::invalid_input(
                "origins",
                "each must be scheme://host[:port] (http or https), without a path",
            ));
        }
        let text = sonic_rs::to_string(&list).unwrap_or_default();
        self.store
            .put_setting(SETTING, &text, now_ms())
            .map_err(|e| ApiError::storage(&e))?;
        self.apply(list);
        Announcement::OriginsChanged.tell(self.control.get());
        tracing::info!(user_id = %who.user_id, origins = %text, "allowed origins changed");
        self.get(who)
    }
}
