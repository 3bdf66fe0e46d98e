"""Accounts and access: passwords, tokens, roles and the principal of a request.

* :mod:`server.auth.passwords` -- argon2id hashes (argon2-cffi);
* :mod:`server.auth.tokens` -- JWT access tokens (PyJWT) and opaque personal, agent and refresh tokens;
* :mod:`server.auth.permissions` -- the one table of what each role may do;
* :mod:`server.auth.principal` -- who is calling, resolved from a bearer token;
* :mod:`server.auth.service` -- users, projects, memberships, logins and tokens in the database.
"""
