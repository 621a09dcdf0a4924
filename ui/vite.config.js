// The dashboard's build: served by flotilla-hub under /ui/, hashed asset
// names (cached for a year by the hub), nothing inlined into index.html (the
// hub's Content-Security-Policy allows only same-origin files).
import { defineConfig } from 'vite';

export default defineConfig({
  base: '/ui/',
  build: {
    target: 'es2020',
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
    reportCompressedSize: false,
    chunkSizeWarningLimit: 400,
  },
});
