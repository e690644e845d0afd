#!/usr/bin/env node
// Opens one task in the Label Studio UI, as an annotator does, and reports what the labeling panel shows:
// the regions in the outliner and the text of every text field. Drives Debian's Chromium through
// playwright-core (no browser download), like draw_box.js.
//
//   node open_task.js --url http://127.0.0.1:8080 --email admin@example.com --project 1 --task 2 \
//        --screenshot /tmp/shot.png                                  (password from LS_PASSWORD)
//
// Prints one JSON line on stdout: {"ok": true, "regions": 3, "texts": [<values of the text fields>],
// "page_text": <the page's visible text>, "reloads": 0, "screenshot": "..."}
// and exits 0; on a failure {"ok": false, "error": "..."} and exit code 1 (the screenshot then shows the
// page when the step failed). Options: --timeout-ms (per step, default 60000), --chromium PATH.

'use strict';

const { parseArgs } = require('node:util');
const { chromium } = require('playwright-core');

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run',
];
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]']);

function readOptions() {
  const { values } = parseArgs({
    options: {
      url: { type: 'string', default: process.env.LS_URL },
      email: { type: 'string', default: process.env.LS_EMAIL },
      password: { type: 'string', default: process.env.LS_PASSWORD },
      project: { type: 'string' },
      task: { type: 'string' },
      screenshot: { type: 'string' },
      'timeout-ms': { type: 'string', default: '60000' },
      chromium: { type: 'string', default: process.env.CHROMIUM_PATH || '/usr/bin/chromium' },
    },
  });
  const missing = ['url', 'email', 'password', 'project', 'task', 'screenshot'].filter((k) => !values[k]);
  if (missing.length) throw new Error(`missing options: ${missing.join(', ')} (url/email/password may come from LS_URL/LS_EMAIL/LS_PASSWORD)`);
  return { ...values, url: values.url.replace(/\/+$/, ''), timeout: Number(values['timeout-ms']) };
}

async function openTask(opts, page, report) {
  await page.goto(`${opts.url}/user/login/`);
  await page.fill('input[name=email]', opts.email);
  await page.fill('input[name=password]', opts.password);
  await Promise.all([page.waitForURL((u) => !u.pathname.startsWith('/user/login')), page.click('button[type=submit]')]);

  // The task's regions arrive with it; the outliner lists them once the image is drawn. Seen once with
  // LS 1.23.2: the editor came up without the task's predictions (the Data Manager's task list arrived after
  // the task); a reload showed them.
  const firstRegion = page.locator('[role=treeitem].lsf-tree__node_type_rectangleregion').first();
  report.reloads = 0;
  await page.goto(`${opts.url}/projects/${opts.project}/data?task=${opts.task}`);
  for (;;) {
    await page.waitForSelector('canvas');
    await page.locator('.lsf-label').first().waitFor();
    try {
      await firstRegion.waitFor({ timeout: Math.min(opts.timeout, 12000) });
      break;
    } catch (error) {
      if (report.reloads >= 1) throw error;
      report.reloads += 1;
      await page.reload();
    }
  }
  // Selecting the first region shows its per-region fields in the side panel.
  await page.locator('[role=treeitem].lsf-tree__node_type_rectangleregion').first().click();
  report.regions = await page.locator('[role=treeitem].lsf-tree__node_type_rectangleregion').count();
  report.texts = await page.$$eval('textarea', (items) => items.map((t) => t.value).filter((v) => v));
  // Submitted TextArea values are shown as text, not in a <textarea>.
  report.page_text = await page.locator('body').innerText();
  await page.screenshot({ path: opts.screenshot });
}

async function main() {
  let opts;
  try {
    opts = readOptions();
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
      await openTask(opts, page, report);
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

main();
