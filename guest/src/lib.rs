//! osso-guest: builds and locates the Osso guest image.
