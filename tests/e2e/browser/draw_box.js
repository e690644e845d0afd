#!/usr/bin/env node
// Draws one box with the smart rectangle tool in the Label Studio UI, the way an annotator does with
// Auto-Annotation on, and reports what the ML backend's interactive answer put into the region's
// per-region text field. Drives Debian's Chromium through playwright-core (no browser download).
//
//   node draw_box.js --url http://127.0.0.1:8080 --email admin@example.com --project 1 --task 2 \
//        --box 0.2,0.25,0.5,0.7 --screenshot /tmp/shot.png        (password from LS_PASSWORD)
//
// Prints one JSON line on stdout:
//   {"ok": true, "status": 200, "body": <LS's reply: {"data": ...} or {"errors": [...]}>,
//    "texts": ["..."], "label": "Object", "regions_before": 1, "regions_after": 2, "screenshot": "...", ...}
// and exits 0; on a failure {"ok": false, "error": "...", ...} and exit code 1. The screenshot shows the
// page once the answer is applied (or when a step failed). With --submit it then clicks Submit (or
// Update) and adds "submit_status" and "annotation_id". Options: --label NAME (default: the first label),
// --timeout-ms (per step, default 60000), --chromium PATH (default /usr/bin/chromium).

'use strict';

const { logIn, readOptions, runInBrowser } = require('./label_studio_page');

function readDrawOptions() {
  const opts = readOptions(
    { box: { type: 'string' }, label: { type: 'string' }, submit: { type: 'boolean', default: false } },
    ['box'],
  );
  const box = opts.box.split(',').map(Number);
  if (box.length !== 4 || box.some((v) => !(v >= 0 && v <= 1)) || box[0] >= box[2] || box[1] >= box[3]) {
    throw new Error(`--box must be x1,y1,x2,y2 fractions of the canvas with x1<x2 and y1<y2, got ${opts.box}`);
  }
  return { ...opts, box };
}

// Regions in the outliner: [{index, texts}], index being the number LS shows (new regions get the highest).
async function readRegions(page) {
  return page.$$eval('[role=treeitem].lsf-tree__node_type_rectangleregion', (items) => items.map((item) => ({
    index: Number((item.querySelector('.lsf-outliner-item__index') || {}).textContent || NaN),
    texts: Array.from(item.querySelectorAll('textarea[data-testid="textarea-region-textarea"]'), (t) => t.value),
  })));
}

async function largestCanvas(page) {
  let best = null;
  for (const canvas of await page.$$('canvas')) {
    const rect = await canvas.boundingBox();
    if (rect && (!best || rect.width * rect.height > best.width * best.height)) best = rect;
  }
  if (!best) throw new Error('no canvas on the labeling page');
  return best;
}

async function drawBox(opts, page, report) {
  const started = Date.now();
  await logIn(opts, page);

  await page.goto(`${opts.url}/projects/${opts.project}/data?task=${opts.task}`);
  await page.waitForSelector('canvas');
  // The task is ready when the image is drawn and the label chips are there.
  const labelChip = opts.label
    ? page.locator('.lsf-label', { hasText: opts.label }).first()
    : page.locator('.lsf-label').first();
  await labelChip.waitFor();
  report.label = (await labelChip.innerText()).split('\n')[0].trim();
  report.task_opened_ms = Date.now() - started;

  // Auto-Annotation makes the UI send smart-tool drawings to the backend; Auto-Accept applies the answer.
  await page.locator('[data-testid="bottombar-auto-annotation-toggle"]').check({ force: true });
  await page.locator('[data-testid="bottombar-auto-accept-toggle"]').check({ force: true });

  await page.click('.lsf-tool.lsf-tool_smart');
  await page.click('.lsf-toolbar__smart [aria-label="rectangle-tool"]');
  await labelChip.click();

  const before = await readRegions(page);
  report.regions_before = before.length;
  const canvas = await largestCanvas(page);
  const [x1, y1, x2, y2] = opts.box;
  const answer = page.waitForResponse((r) => r.url().includes('/interactive-annotating'));
  await page.mouse.move(canvas.x + x1 * canvas.width, canvas.y + y1 * canvas.height);
  await page.mouse.down();
  await page.mouse.move(canvas.x + x2 * canvas.width, canvas.y + y2 * canvas.height, { steps: 12 });
  await page.mouse.up();
  const response = await answer;
  report.status = response.status();
  report.body = await response.json().catch(() => null);
  report.interactive_ms = Date.now() - started - report.task_opened_ms;

  // The UI applies the suggestion after the response: wait until the new region shows a text, or give up
  // (an answer without text is a result too, so the deadline is short and not an error).
  const newest = async () => {
    const regions = await readRegions(page);
    return { regions, region: regions.reduce((a, b) => (b.index > (a ? a.index : -Infinity) ? b : a), null) };
  };
  const deadline = Date.now() + 5000;
  let state = await newest();
  while (Date.now() < deadline && !(state.regions.length > before.length && state.region.texts.some((t) => t))) {
    await page.waitForTimeout(100);
    state = await newest();
  }
  report.regions_after = state.regions.length;
  report.texts = state.regions.length > before.length ? state.region.texts : [];
  await page.screenshot({ path: opts.screenshot });

  if (opts.submit) {
    // Submit (a new annotation) or Update (the task already has one of ours): LS answers with the annotation.
    const saved = page.waitForResponse((r) => /\/api\/(tasks\/\d+\/annotations|annotations\/\d+)/.test(r.url())
      && ['POST', 'PATCH'].includes(r.request().method()));
    await page.locator('[data-testid="bottombar-submit-button"], [data-testid="bottombar-update-button"]').first().click();
    const response = await saved;
    report.submit_status = response.status();
    report.annotation_id = ((await response.json().catch(() => null)) || {}).id ?? null;
  }
}

runInBrowser(readDrawOptions, drawBox);
