#!/usr/bin/env node
// Clicks "Start Training" on a project's model card in Label Studio's settings, as a user does, then
// opens the backend's training status page, where Label Studio's own dialog says to look ("monitor the
// model's training ... through the model's own tools"). Drives Debian's Chromium through playwright-core.
//
//   node start_training.js --url http://127.0.0.1:8080 --email admin@example.com --project 1 --task 0 \
//        --status-url http://127.0.0.1:9090/training/1 --screenshot /tmp/shot.png   (password from LS_PASSWORD)
//
// Prints one JSON line: {"ok": true, "dialog": <the dialog's text>, "status_page": <the status page's text>,
// "screenshot": ...} and exits 0; on a failure {"ok": false, "error": ...} and exit code 1.

'use strict';

const { logIn, readOptions, runInBrowser } = require('./label_studio_page');

async function startTraining(opts, page, report) {
  await logIn(opts, page);
  await page.goto(`${opts.url}/projects/${opts.project}/settings/ml`);
  await page.locator('[aria-label="Machine learning model options"]').first().click();
  await page.getByText('Start Training', { exact: true }).first().click();
  await page.getByText('Start Model Training').first().waitFor();
  await page.getByRole('button', { name: 'Start Training', exact: true }).last().click();
  const sent = page.getByText('Request Sent!').first();
  await sent.waitFor();
  report.dialog = await sent.locator('xpath=../..').innerText();
  await page.screenshot({ path: opts.screenshot });

  const status = await page.context().newPage();
  await status.goto(opts['status-url']);
  report.status_page = await status.locator('body').innerText();
}

runInBrowser(() => readOptions({ 'status-url': { type: 'string' } }, ['status-url']), startTraining);
