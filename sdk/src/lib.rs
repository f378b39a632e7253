//! osso-sdk: what applications use.
