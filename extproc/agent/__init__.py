"""`muster-edge agent`: a stdio MCP server for clients that only launch commands, forwarding to a gateway.

`forward.py` relays JSON-RPC between stdin/stdout and the gateway's streamable-HTTP endpoint (both eras),
`login.py` is the interactive OAuth login (authorization code + PKCE, loopback redirect), `tokens.py` the
token cache in the user's config directory, `main.py` ties them together and offers `authenticate_muster`
while there is no token.
"""
