"""Ray's Jobs API from this side: the client (addresses, token auth), credentials, `mmpt submit`."""
