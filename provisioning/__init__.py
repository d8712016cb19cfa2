"""Factory provisioning: identities, certificates, bundles, birth records."""
