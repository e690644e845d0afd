#!/usr/bin/env node
// Opens one task in the Label Studio UI, as an annotator does, and reports what the labeling panel shows:
// the regions in the outliner and the text of every text field. Drives Debian's Chromium through
// playwright-core (no browser download), like annotate.js.
//
//   node open_task.js --url http://127.0.0.1:8080 --email admin@example.com --project 1 --task 2 \
//        --screenshot /tmp/shot.png                                  (password from LS_PASSWORD)
//
// Prints one JSON line on stdout: {"ok": true, "regions": 3, "texts": [<values of the text fields>],
// "page_text": <the page's visible text>, "reloads": 0, "screenshot": "..."}
// and exits 0; on a failure {"ok": false, "error": "..."} and exit code 1 (the screenshot then shows the
// page when the step failed). Options: --timeout-ms (per step, default 60000), --chromium PATH.

'use strict';

const { logIn, readOptions, runInBrowser } = require('./label_studio_page');

async function openTask(opts, page, report) {
  await logIn(opts, page);

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

runInBrowser(() => readOptions(), openTask);
