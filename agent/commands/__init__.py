"""Signed orders in, results out: the envelope, argument schema, journal, SMS transport and the
handlers that carry each order out."""
