#!/usr/bin/env node
// Works on one task in the Label Studio UI the way an annotator does with Auto-Annotation and Auto-Accept
// on: a sequence of steps, each followed by the ML backend's interactive answer, then reports what the
// labeling panel shows. Drives Debian's Chromium through playwright-core (no browser download).
//
//   node annotate.js --url http://127.0.0.1:8080 --email admin@example.com --project 1 --task 2 \
//        --steps '[{"draw": [0.2, 0.25, 0.5, 0.7]}, {"type": "What colour is it?", "into": "question"}]' \
//        --screenshot /tmp/shot.png                                   (password from LS_PASSWORD)
//
// Steps:
//   {"draw": [x1, y1, x2, y2]}          a box with the smart rectangle tool (fractions of the canvas)
//   {"type": TEXT, "into": HINT}        TEXT into the newest box's field whose placeholder holds HINT, then Enter
//   {"wait_text": TEXT}                 until TEXT shows on the page (e.g. an answer)
// Every draw and type step waits for the /interactive-annotating call it makes (none: "call": null after
// 3 s) and then for the editor to apply it. Prints one JSON line:
//   {"ok": true, "steps": [{"step", "call": {"status", "body", "ms"}}], "regions": [{"index", "texts"}],
//    "task_texts": [...], "choices": [...], "label", "screenshot", ...}
// and exits 0; on a failure {"ok": false, "error": ...} and exit code 1. With --submit it then clicks
// Submit (or Update) and adds "submit_status" and "annotation_id".

'use strict';

const { logIn, readOptions, runInBrowser } = require('./label_studio_page');

const REGION = '[role=treeitem].lsf-tree__node_type_rectangleregion';

function readAnnotateOptions() {
  const opts = readOptions({ steps: { type: 'string' }, label: { type: 'string' }, submit: { type: 'boolean', default: false } }, ['steps']);
  const steps = JSON.parse(opts.steps);
  for (const step of steps) {
    if (step.draw) {
      const b = step.draw;
      if (b.length !== 4 || b.some((v) => !(v >= 0 && v <= 1)) || b[0] >= b[2] || b[1] >= b[3]) {
        throw new Error(`a draw step needs x1,y1,x2,y2 fractions of the canvas with x1<x2 and y1<y2, got ${b}`);
      }
    } else if (!(step.type && step.into) && !step.wait_text) {
      throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
  }
  return { ...opts, steps };
}

// Regions in the outliner: [{index, texts}], index being the number LS shows (new regions get the highest).
async function readRegions(page) {
  return page.$$eval(REGION, (items) => items.map((item) => ({
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

// The interactive call a step makes, or null when it makes none within `quietMs`.
function nextCall(page, quietMs) {
  return page.waitForResponse((r) => r.url().includes('/interactive-annotating'), { timeout: quietMs })
    .then(async (response) => ({ status: response.status(), body: await response.json().catch(() => null) }))
    .catch(() => null);
}

async function settle(page, before, ms = 3000) {
  // The editor applies a reply right after it arrives; give it a moment, ending as soon as texts change.
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const now = JSON.stringify(await readRegions(page));
    if (now !== before) return;
    await page.waitForTimeout(100);
  }
}

async function annotate(opts, page, report) {
  const started = Date.now();
  await logIn(opts, page);
  await page.goto(`${opts.url}/projects/${opts.project}/data?task=${opts.task}`);
  await page.waitForSelector('canvas');
  const labelChip = opts.label ? page.locator('.lsf-label', { hasText: opts.label }).first() : page.locator('.lsf-label').first();
  await labelChip.waitFor();
  report.label = (await labelChip.innerText()).split('\n')[0].trim();
  report.task_opened_ms = Date.now() - started;

  // Auto-Annotation makes the UI send smart-tool boxes to the backend; Auto-Accept applies the answer.
  await page.locator('[data-testid="bottombar-auto-annotation-toggle"]').check({ force: true });
  await page.locator('[data-testid="bottombar-auto-accept-toggle"]').check({ force: true });
  await page.click('.lsf-tool.lsf-tool_smart');
  await page.click('.lsf-toolbar__smart [aria-label="rectangle-tool"]');

  report.steps = [];
  report.regions_before = (await readRegions(page)).length;
  for (const step of opts.steps) {
    const before = JSON.stringify(await readRegions(page));
    // A call's time runs from the annotator's last action (mouse-up, Enter) to the reply.
    let stepStarted = Date.now();
    let call;
    if (step.draw) {
      await labelChip.click();
      const canvas = await largestCanvas(page);
      const [x1, y1, x2, y2] = step.draw;
      const pending = nextCall(page, Math.min(opts.timeout, 120000));
      await page.mouse.move(canvas.x + x1 * canvas.width, canvas.y + y1 * canvas.height);
      await page.mouse.down();
      await page.mouse.move(canvas.x + x2 * canvas.width, canvas.y + y2 * canvas.height, { steps: 12 });
      stepStarted = Date.now();
      await page.mouse.up();
      call = await pending;
    } else if (step.type) {
      const newest = page.locator(REGION).last();
      await newest.click();
      const field = newest.locator(`[placeholder*="${step.into}" i]`).first();
      await field.click();
      await field.fill(step.type);
      const pending = nextCall(page, Math.min(opts.timeout, 120000));
      stepStarted = Date.now();
      await field.press('Enter');
      call = await pending;
    } else {
      await page.getByText(step.wait_text, { exact: false }).first().waitFor();
    }
    if (call) call.ms = Date.now() - stepStarted;
    report.steps.push({ step, call: call || null });
    if (call) await settle(page, before);
  }
  report.regions = await readRegions(page);
  const regionTexts = new Set(report.regions.flatMap((r) => r.texts));
  report.task_texts = (await page.$$eval('textarea', (items) => items.map((t) => t.value).filter((v) => v)))
    .filter((text) => !regionTexts.has(text));
  report.page_text = await page.locator('body').innerText();
  await page.screenshot({ path: opts.screenshot });

  if (opts.submit) {
    const saved = page.waitForResponse((r) => /\/api\/(tasks\/\d+\/annotations|annotations\/\d+)/.test(r.url())
      && ['POST', 'PATCH'].includes(r.request().method()));
    await page.locator('[data-testid="bottombar-submit-button"], [data-testid="bottombar-update-button"]').first().click();
    const response = await saved;
    report.submit_status = response.status();
    report.annotation_id = ((await response.json().catch(() => null)) || {}).id ?? null;
  }
}

runInBrowser(readAnnotateOptions, annotate);
