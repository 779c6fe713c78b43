//! Settings (stage 1 of [`super`]): what a re-send needs from a configured destination,
//! also what the dead-letter store keeps.

use super::error::SettingsError;
use crate::config::Destination;
pub use crate::storage::DestinationSettings;

/// The settings a re-send needs, from a configured destination.
pub fn destination_settings(
    destination: &Destination,
) -> Result<DestinationSettings, SettingsError> {
    let headers = destination
        .parsed_headers()
        .map_err(SettingsError::Config)?;
    Ok(DestinationSettings {
        id: destination.id.clone(),
        request_url: destination.request_url(),
        headers,
        auth: destination.auth.clone(),
        delivery: destination.delivery.clone(),
        tls: destination
            .tls
            .as_ref()
            .filter(|tls| !tls.is_empty())
            .map(|tls| tls.absolute()),
    })
}
