//! osso-sdk: what applications use to get a fresh Osso microVM per request.

pub mod job;
