// Runs Mercure's upstream conformance suite (dunglas/mercure `conformance-tests/mercure.spec.ts`,
// not vendored: scripts/mercure-conformance extracts it from a Mercure checkout into
// MERCURE_SPEC_DIR) in Debian's headless Chromium against a hub at BASE_URL.
import { defineConfig } from '@playwright/test';

export default defineConfig({
  testDir: process.env.MERCURE_SPEC_DIR,
  timeout: 10_000,
  retries: 0,
  workers: 1,
  reporter: [['list']],
  outputDir: '../../target/mercure-conformance/results',
  use: {
    baseURL: process.env.BASE_URL,
    ignoreHTTPSErrors: true,
    launchOptions: { executablePath: process.env.CHROMIUM || '/usr/bin/chromium' },
  },
  projects: [{ name: 'chromium', use: { browserName: 'chromium' } }],
});
