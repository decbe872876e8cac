"""Pull and push over the OCI distribution protocol.

`hosts` decides where a reference's registry is reached (mirrors, scheme, CA), `auth`
answers WWW-Authenticate challenges (basic and bearer tokens), `credentials` reads and
writes docker's config.json, `transport` is the HTTP client (urllib3: pooled connections,
streaming bodies, typed errors), `pull` and `push` walk images between a registry and the
content store.
"""
