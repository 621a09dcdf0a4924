import { html } from 'htm/preact';
import { useState } from 'preact/hooks';
import { api } from '../lib/api.js';

export function SignIn({ onSignedIn, notice }) {
  const [token, setToken] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError('');
    try {
      const t = token.trim();
      const w = await api('/v1/whoami', { tokenOverride: t });
      onSignedIn(t, w);
    } catch (err) {
      setError(err.status === 401 ? 'The hub does not accept this token (unknown, expired or revoked).' : err.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<main id="main" class="signin">
    <h1>Flotilla</h1>
    <p>Sign in with an API token (<code>flotilla token create</code>). It stays in this browser tab only and is sent to
      the hub in a header, never in a link.</p>
    ${notice && html`<p class="notice" role="status">${notice}</p>`}
    <form onSubmit=${submit}>
      <label for="token">API token</label>
      <input id="token" name="token" type="password" autocomplete="off" spellcheck="false" required
        value=${token} onInput=${(e) => setToken(e.target.value)} aria-describedby=${error ? 'signin-error' : undefined} />
      <button type="submit" class="primary" disabled=${busy || !token.trim()}>Sign in</button>
      ${error && html`<p id="signin-error" class="error" role="alert">${error}</p>`}
    </form>
  </main>`;
}
