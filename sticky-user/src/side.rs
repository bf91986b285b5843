//! The services sticky runs beside the port, off the data path: the
//! control socket, the relay socket beside it and the metrics endpoint.
//!
//! They are bound during start-up, while sticky still holds every
//! privilege (a control socket's owner and mode, a privileged metrics
//! port), and served only after the privilege drop, since capabilities
//! are per thread and serving starts threads.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Result;

use crate::{cli, cli::Settings, control, log, metrics, relay, sessions::SessionTable};

/// The side services, bound and not yet served.
pub struct SideServices {
    pub control_path: PathBuf,
    control: control::ControlSocket,
    pub relay: Arc<relay::Relay>,
    remove_relay: control::RemoveOnDrop,
    metrics: Option<metrics::MetricsServer>,
}

/// What keeps the side services' socket files: dropped when sticky exits.
pub struct Served {
    _remove_control: control::RemoveOnDrop,
    _remove_relay: control::RemoveOnDrop,
}

impl SideServices {
    /// Binds the control socket (`--control`, or the port's default), the
    /// relay socket beside it and `--metrics`; with `--user`, the control
    /// socket becomes reachable by that user's group only.
    pub fn bind(
        settings: &Settings,
        port: u16,
        sessions: &Arc<Mutex<SessionTable>>,
    ) -> Result<SideServices> {
        let control_path = settings
            .control
            .clone()
            .unwrap_or_else(|| cli::default_control(port));
        let control = control::ControlSocket::bind(&control_path)?;
        let (relay, remove_relay) = relay::Relay::start(&control_path, sessions.clone())?;
        if let Some(who) = &settings.run_as {
            control.only_for(who)?;
        }
        let metrics = settings
            .metrics
            .map(metrics::MetricsServer::bind)
            .transpose()?;
        Ok(SideServices {
            control_path,
            control,
            relay,
            remove_relay,
            metrics,
        })
    }

    /// Serves each on its own thread: only after the privilege drop.
    pub fn serve(self, state: control::ControlState) -> Result<Served> {
        self.relay.serve()?;
        if let Some(server) = self.metrics {
            if let Some(addr) = server.local_addr() {
                log!("metrics on http://{addr}/metrics");
            }
            server.serve(state.clone());
        }
        Ok(Served {
            _remove_control: self.control.serve(state),
            _remove_relay: self.remove_relay,
        })
    }
}
