"""Who is calling: identities from credentials other than the gateway's own API keys."""
