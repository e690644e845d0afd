// What annotate.js and open_task.js share: the common command-line options, the headless Chromium
// session that lets no request leave the machine, the log-in, and the one-JSON-line report.

'use strict';

const { parseArgs } = require('node:util');
const { chromium } = require('playwright-core');

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run',
];
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]']);
const COMMON_OPTIONS = {
  url: { type: 'string', default: process.env.LS_URL },
  email: { type: 'string', default: process.env.LS_EMAIL },
  password: { type: 'string', default: process.env.LS_PASSWORD },
  project: { type: 'string' },
  task: { type: 'string' },
  screenshot: { type: 'string' },
  'timeout-ms': { type: 'string', default: '60000' },
  chromium: { type: 'string', default: process.env.CHROMIUM_PATH || '/usr/bin/chromium' },
};

// The common options plus `extra` (parseArgs descriptors); `required` lists the extra ones that must be given.
function readOptions(extra = {}, required = []) {
  const { values } = parseArgs({ options: { ...COMMON_OPTIONS, ...extra } });
  const missing = ['url', 'email', 'password', 'project', 'task', 'screenshot', ...required].filter((k) => !values[k]);
  if (missing.length) throw new Error(`missing options: ${missing.join(', ')} (url/email/password may come from LS_URL/LS_EMAIL/LS_PASSWORD)`);
  return { ...values, url: values.url.replace(/\/+$/, ''), timeout: Number(values['timeout-ms']) };
}

async function logIn(opts, page) {
  await page.goto(`${opts.url}/user/login/`);
  await page.fill('input[name=email]', opts.email);
  await page.fill('input[name=password]', opts.password);
  await Promise.all([page.waitForURL((u) => !u.pathname.startsWith('/user/login')), page.click('button[type=submit]')]);
}

// Parse the options with `parse`, run `step(opts, page, report)` in a fresh browser, print the report as
// one JSON line and exit: 0 when the step finished, 1 when it threw (the screenshot then shows the page
// when it went wrong), 2 on bad options.
async function runInBrowser(parse, step) {
  let opts;
  try {
    opts = parse();
  } catch (error) {
    console.log(JSON.stringify({ ok: false, error: error.message }));
    process.exit(2);
  }
  const report = { ok: false, screenshot: opts.screenshot, aborted_requests: [] };
  const browser = await chromium.launch({ executablePath: opts.chromium, headless: true, args: CHROMIUM_ARGS });
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
    context.setDefaultTimeout(opts.timeout);
    // Nothing leaves the machine: Label Studio's pages must work from 127.0.0.1 alone.
    await context.route('**/*', (route) => {
      const host = new URL(route.request().url()).hostname;
      if (LOOPBACK.has(host)) return route.continue();
      report.aborted_requests.push(host);
      return route.abort();
    });
    const page = await context.newPage();
    try {
      await step(opts, page, report);
      report.ok = true;
    } catch (error) {
      report.error = error.message.split('\n')[0];
      await page.screenshot({ path: opts.screenshot }).catch((e) => { report.screenshot_error = e.message; });
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(report));
  process.exit(report.ok ? 0 : 1);
}

module.exports = { logIn, readOptions, runInBrowser };
