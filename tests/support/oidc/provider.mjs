// A real OpenID provider for Usher's tests: the npm `oidc-provider` package, configured from
// a JSON file that tests/support/src/oidc.rs writes, serving HTTPS on 127.0.0.1.
//
//   node provider.mjs CONFIG.json
//
// The package is imported from the directory in $USHER_OIDC_PROVIDER_MODULES (a
// node_modules that `cargo xtask setup` filled), so this file can stay in the source tree.
// oidc-provider 9 warns "Unsupported runtime" on Node 20 (it asks for 22 LTS); what it uses
// (URL.parse, crypto.hash) is in Node 20.20, and tests/tests/infra.rs drives every flow here.
//
// Signing keys live in the config's `keys_file`: a JSON list of {kid, alg, pem} (PKCS#8
// private keys that tests/support/src/oidc.rs makes with `openssl` and rotates), the first
// one signs, all are published.
//
// Pages a browser (or the Rust helpers) goes through, all plain HTML forms:
//   GET  /interaction/:uid          sign-in page: form#login, input[name=username], button#sign-in;
//                                   form#abort with button#abort-button (denies the request)
//   POST /interaction/:uid/login    username=NAME  (an unknown name re-renders the page, 403)
//   POST /interaction/:uid/abort    ends the request with error=access_denied
//   GET  /device                    form#device-code, input[name=user_code], button#device-continue
//   (confirm page)                  form#device-confirm, button#device-confirm-continue;
//                                   button#device-abort (name=abort) denies
// Consent is given automatically: every client here is first-party.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node provider.mjs CONFIG.json');
  process.exit(2);
}
const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));

console.log(`${new Date().toISOString()} provider.mjs ${process.pid} starting`);
const modules = process.env.USHER_OIDC_PROVIDER_MODULES;
if (!modules) {
  console.error('USHER_OIDC_PROVIDER_MODULES is not set (the node_modules holding oidc-provider)');
  process.exit(2);
}
const { default: Provider, errors } = await import(
  pathToFileURL(path.join(modules, 'oidc-provider', 'lib', 'index.js')).href
);

// ---- keys ----------------------------------------------------------------------------

const keys = JSON.parse(fs.readFileSync(config.keys_file, 'utf8')).map(({ kid, alg, pem }) => ({
  ...crypto.createPrivateKey(pem).export({ format: 'jwk' }),
  kid,
  alg,
  use: 'sig',
}));
console.log(`${new Date().toISOString()} signing key ${keys[0].kid} (${keys.length} published)`);

// ---- accounts ------------------------------------------------------------------------

// Keyed by user name: two names may share a `sub` (a test of "the same person under
// another name"), so the account id the provider keeps is the name, and `sub` is mapped
// from it where claims are released (see Claims.prototype.result below).
const accounts = new Map(config.accounts.map((account) => [account.username, account]));

async function findAccount(_ctx, id) {
  const account = accounts.get(id);
  if (!account) return undefined;
  return {
    accountId: id,
    async claims() {
      return {
        sub: id,
        preferred_username: account.username,
        name: account.name ?? account.username,
        email: account.email,
        email_verified: true,
        groups: account.groups,
      };
    },
  };
}

// ---- workloads -----------------------------------------------------------------------

const workloads = new Map(config.workloads.map((workload) => [workload.client_id, workload]));

// ---- pages ---------------------------------------------------------------------------

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><h1>${escapeHtml(title)}</h1>
${body}
</body></html>`;
}

function loginPage(uid, clientName, message) {
  return page('Sign in', `${message ? `<p id="error">${escapeHtml(message)}</p>` : ''}
<p>to <span id="client">${escapeHtml(clientName)}</span></p>
<form id="login" method="post" action="/interaction/${escapeHtml(uid)}/login">
  <label>User name <input type="text" name="username" id="username" autofocus autocomplete="off"></label>
  <button type="submit" id="sign-in">Sign in</button>
</form>
<form id="abort" method="post" action="/interaction/${escapeHtml(uid)}/abort">
  <button type="submit" id="abort-button">Cancel</button>
</form>`);
}

// The device pages get `form` from the provider: a form with hidden fields (xsrf, user
// code) that the buttons submit through their `form` attribute.
async function userCodeInputSource(ctx, form, _out, err) {
  const message = err ? '<p id="error">That code is not valid. Try again.</p>' : '';
  const withIds = form
    .replace('id="op.deviceInputForm"', 'id="device-code"')
    .replace('name="user_code"', 'name="user_code" id="user_code"');
  ctx.body = page('Device sign-in', `${message}
<p>Enter the code shown on your device.</p>
${withIds}
<button type="submit" form="device-code" id="device-continue">Continue</button>`);
}

async function userCodeConfirmSource(ctx, form, client, _deviceInfo, userCode) {
  const withIds = form.replace('id="op.deviceConfirmForm"', 'id="device-confirm"');
  ctx.body = page('Confirm device', `
<p>Sign in to <span id="client">${escapeHtml(client.clientName || client.clientId)}</span>
with the code <code id="user-code">${escapeHtml(userCode)}</code>?</p>
${withIds}
<button type="submit" form="device-confirm" id="device-confirm-continue">Continue</button>
<button type="submit" form="device-confirm" name="abort" value="yes" id="device-abort">Abort</button>`);
}

async function successSource(ctx) {
  ctx.body = page('Signed in', '<p id="success">You are signed in on your device. You can close this page.</p>');
}

async function renderError(ctx, out) {
  ctx.type = 'html';
  ctx.body = page('Error', Object.entries(out)
    .map(([key, value]) => `<p class="error" data-key="${escapeHtml(key)}">${escapeHtml(key)}: ${escapeHtml(value)}</p>`)
    .join('\n'));
}

// ---- the provider --------------------------------------------------------------------

const alg = config.alg;
const clients = [
  {
    client_id: config.web_client.client_id,
    client_secret: config.web_client.client_secret,
    client_name: 'Usher (web)',
    redirect_uris: config.web_client.redirect_uris,
    post_logout_redirect_uris: config.web_client.post_logout_redirect_uris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: config.web_client.token_endpoint_auth_method,
    id_token_signed_response_alg: alg,
  },
  {
    client_id: config.cli_client.client_id,
    client_name: 'Usher (CLI)',
    application_type: 'native',
    redirect_uris: config.cli_client.redirect_uris,
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'none',
    id_token_signed_response_alg: alg,
  },
  ...config.workloads.map((workload) => ({
    client_id: workload.client_id,
    client_secret: workload.client_secret,
    client_name: workload.client_id,
    redirect_uris: [],
    grant_types: ['client_credentials'],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: alg,
  })),
];

const provider = new Provider(config.issuer, {
  clients,
  jwks: { keys },
  findAccount,
  cookies: { keys: [config.cookie_secret] },
  claims: {
    // `groups` also comes with plain `openid`, as many providers configure it.
    openid: ['sub', 'groups'],
    profile: ['preferred_username', 'name'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups'],
  // Claims of every granted scope go in the ID token, not only to the userinfo endpoint.
  conformIdTokenClaims: false,
  enabledJWA: {
    idTokenSigningAlgValues: ['RS256', 'ES256'],
  },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      userCodeInputSource,
      userCodeConfirmSource,
      successSource,
    },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // A workload asks for a token with `resource` = its audience; the token is a JWT.
      async getResourceServerInfo(_ctx, resourceIndicator, client) {
        const workload = workloads.get(client.clientId);
        if (!workload) throw new errors.InvalidTarget();
        return {
          scope: 'workload',
          audience: resourceIndicator,
          accessTokenTTL: workload.token_ttl_secs,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg } },
        };
      },
      async defaultResource(_ctx, _client, oneOf) {
        return oneOf;
      },
    },
  },
  formats: {
    customizers: {
      // GitHub Actions-like ID tokens: the workload's claims, its `sub`, and `typ: JWT`.
      async jwt(_ctx, token, jwt) {
        const workload = workloads.get(token.clientId);
        if (!workload) return;
        Object.assign(jwt.payload, workload.claims);
        jwt.header = { ...(jwt.header ?? {}), typ: workload.typ };
      },
    },
  },
  ttl: {
    AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 3600,
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 600,
    IdToken: () => config.id_token_ttl_secs,
    DeviceCode: () => 600,
    Interaction: () => 3600,
    Session: () => 3600,
    Grant: () => 3600,
    RefreshToken: () => 3600,
  },
  interactions: {
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  pkce: {
    required: () => false,
  },
  renderError,
});

// The provider uses the account id (here the user name) as `sub`; ID tokens and userinfo
// answers carry the account's own `sub` instead.
const claimsResult = provider.Claims.prototype.result;
provider.Claims.prototype.result = async function result(...args) {
  const claims = await claimsResult.apply(this, args);
  const account = claims.sub === undefined ? undefined : accounts.get(claims.sub);
  if (account) claims.sub = account.sub;
  return claims;
};

// ---- interactions ---------------------------------------------------------------------

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

// Every client is first-party: grant what was asked for, so no consent page is needed.
async function grantConsent(req, res, details) {
  const { prompt: { details: missing }, grantId, session, params } = details;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  await provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, {
    mergeWithLastSubmission: true,
  });
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, page('Error', '<p class="error">interaction mismatch</p>'));
  const client = await provider.Client.find(details.params.client_id);
  const clientName = client?.clientName ?? details.params.client_id;

  if (action === 'abort' && req.method === 'POST') {
    return provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'the user cancelled the sign-in',
    }, { mergeWithLastSubmission: false });
  }
  if (details.prompt.name === 'consent' && !action && req.method === 'GET') {
    return grantConsent(req, res, details);
  }
  if (details.prompt.name !== 'login') {
    return send(res, 501, page('Error', `<p class="error">prompt ${escapeHtml(details.prompt.name)} is not supported</p>`));
  }
  if (!action && req.method === 'GET') {
    return send(res, 200, loginPage(uid, clientName));
  }
  if (action === 'login' && req.method === 'POST') {
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    if (!accounts.has(username)) {
      console.log(`sign-in refused: unknown user ${JSON.stringify(username)}`);
      return send(res, 403, loginPage(uid, clientName, `unknown user ${username}`));
    }
    console.log(`sign-in: ${username}`);
    return provider.interactionFinished(req, res, { login: { accountId: username } }, {
      mergeWithLastSubmission: false,
    });
  }
  return send(res, 405, page('Error', '<p class="error">method not allowed</p>'));
}

const providerCallback = provider.callback();
const interactionPath = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|abort))?$/;

const server = https.createServer({
  cert: fs.readFileSync(config.tls.cert),
  key: fs.readFileSync(config.tls.key),
}, async (req, res) => {
  const url = new URL(req.url, config.issuer);
  console.log(`${req.method} ${url.pathname}`);
  const match = url.pathname.match(interactionPath);
  if (!match) return providerCallback(req, res);
  try {
    await interaction(req, res, match[1], match[2]);
  } catch (err) {
    console.log(`interaction ${match[1]}: ${err}`);
    if (!res.headersSent) send(res, 400, page('Error', `<p class="error">${escapeHtml(err.message ?? err)}</p>`));
  }
});

provider.on('server_error', (_ctx, err) => console.log(`server_error: ${err.stack ?? err}`));
provider.on('grant.error', (_ctx, err) => console.log(`grant.error: ${err.message} ${err.error_description ?? ''}`));

server.listen(config.port, '127.0.0.1', () => {
  console.log(`${new Date().toISOString()} listening on ${config.issuer}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
