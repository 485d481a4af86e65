"""Talking to registries: the OCI Distribution client and everything it needs.

Owns the HTTP client (``client``), the registries configuration read from
``registries.conf`` (``config``), the mirrors tried before a registry
(``endpoints``), the transport and its TLS/plain-HTTP choice (``transport``,
``schemes``), the bearer/basic challenge flow (``auth``), credential sources
(``credentials``) and ``docker login``'s storing of one (``login``), opening
and resuming blob downloads (``download``), fetching and resolving manifests
(``manifests``), decoding the registry's error bodies (``responses``), which
failures are retried, and how (``retry``), blob and manifest writes
(``push``) and the referrers of a manifest, through the API or the tag-schema
index clients keep (``referrers``) — go-containerregistry's ``remote``,
``transport`` and ``authn``.

May import: ``errors``, ``fsutil``, ``oci``.
"""
