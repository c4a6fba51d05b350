#!/usr/bin/env node
// Open one page of the node's admin pages in headless Chromium (puppeteer-core from
// tests/viewer/node_modules + Debian /usr/bin/chromium), optionally fill in and submit a form as a
// person does, then dump what is rendered as JSON and take a full-page screenshot.
//
//   node page.mjs --url URL --screenshot PAGE.png --out DUMP.json
//                 [--fill SELECTOR=TEXT] [--click SELECTOR] [--window 1280x900]
//                 [--chromium /usr/bin/chromium] [--timeout-ms 30000]
//
// --fill types TEXT into the element SELECTOR (keystroke by keystroke); --click clicks SELECTOR and
// waits for the navigation it starts (a form's submit button): the dump is then of the page that
// navigation ends on. Exit status 0 once the dump is written, 2 when the page could not be opened.
//
// Dump keys:
//   url, final_url, status (HTTP status of the last navigation), title, timings_ms {goto, total},
//   page_errors [str], console_errors [str], request_failures [{url, status|error}],
//   body_text          document.body.innerText
//   html               the serialised DOM (document.documentElement.outerHTML)
//   tables {id: {headers [str], rows [[str]]}}   every <table id=...>: thead and tbody cell texts
//   lists {id: {term: definition}}               every <dl id=...>
//   ids {id: innerText}                          every element with an id (first 2000 characters)
//   images [{id, src, alt, complete, natural_width, natural_height, box {x, y, width, height}}]
//                      box in CSS px of the full-page screenshot (scale 1)
//   forms [{id, action, method, fields [{name, type}], buttons [str]}]
//   links [{text, href}]
//   screenshot         path of the full-page screenshot
//   fatal              only when exit status is 2

import fs from 'node:fs';
import path from 'node:path';
import puppeteer from '../viewer/node_modules/puppeteer-core/lib/esm/puppeteer/puppeteer-core.js';

function parseArgs(argv) {
  const opts = { fills: [], click: null, window: '1280x900', chromium: '/usr/bin/chromium', timeoutMs: 30000 };
  const names = { '--url': 'url', '--screenshot': 'screenshot', '--out': 'out', '--click': 'click',
    '--window': 'window', '--chromium': 'chromium', '--timeout-ms': 'timeoutMs' };
  for (let i = 0; i < argv.length; i += 2) {
    if (i + 1 >= argv.length) throw new Error(`${argv[i]} needs a value`);
    if (argv[i] === '--fill') {
      const at = argv[i + 1].indexOf('=');
      if (at < 1) throw new Error(`--fill SELECTOR=TEXT, got ${argv[i + 1]}`);
      opts.fills.push([argv[i + 1].slice(0, at), argv[i + 1].slice(at + 1)]);
      continue;
    }
    const key = names[argv[i]];
    if (!key) throw new Error(`bad argument ${argv[i]}`);
    opts[key] = argv[i + 1];
  }
  for (const required of ['url', 'screenshot', 'out']) {
    if (!opts[required]) throw new Error(`--${required} is required`);
  }
  opts.timeoutMs = Number(opts.timeoutMs);
  [opts.width, opts.height] = opts.window.split('x').map(Number);
  return opts;
}

// Evaluated in the page: what is rendered, in plain data.
function pageDump() {
  const text = (element) => (element ? element.innerText.trim() : '');
  const tables = {};
  for (const table of document.querySelectorAll('table[id]')) {
    tables[table.id] = {
      headers: [...table.querySelectorAll('thead th')].map(text),
      rows: [...table.querySelectorAll('tbody tr')].map((row) => [...row.querySelectorAll('td')].map(text)),
    };
  }
  const lists = {};
  for (const dl of document.querySelectorAll('dl[id]')) {
    const entries = {};
    for (const dt of dl.querySelectorAll('dt')) {
      const dd = dt.nextElementSibling;
      entries[text(dt)] = dd && dd.tagName === 'DD' ? text(dd) : null;
    }
    lists[dl.id] = entries;
  }
  const ids = {};
  for (const element of document.querySelectorAll('[id]')) ids[element.id] = (element.innerText || '').slice(0, 2000);
  const images = [...document.images].map((img) => {
    const r = img.getBoundingClientRect();
    return { id: img.id || null, src: img.currentSrc || img.src, alt: img.alt, complete: img.complete,
      natural_width: img.naturalWidth, natural_height: img.naturalHeight,
      box: { x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height } };
  });
  const forms = [...document.forms].map((form) => ({
    id: form.id || null, action: form.getAttribute('action'), method: (form.getAttribute('method') || 'get').toLowerCase(),
    fields: [...form.elements].filter((e) => e.name).map((e) => ({ name: e.name, type: e.type })),
    buttons: [...form.querySelectorAll('button')].map(text),
  }));
  const links = [...document.links].map((a) => ({ text: text(a), href: a.getAttribute('href') }));
  return { title: document.title, body_text: document.body.innerText, html: document.documentElement.outerHTML,
    tables, lists, ids, images, forms, links };
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const started = Date.now();
  const watchdog = setTimeout(() => { console.error('page.mjs: watchdog expired'); process.exit(3); }, opts.timeoutMs + 30000);
  const dump = { url: opts.url, final_url: null, status: null, timings_ms: {}, page_errors: [], console_errors: [],
    request_failures: [], harness_errors: [], screenshot: null };
  const write = () => fs.writeFileSync(opts.out, JSON.stringify(dump, null, 1));
  const userDataDir = fs.mkdtempSync(path.join(path.dirname(path.resolve(opts.out)), 'profile-'));
  let browser;
  try {
    browser = await puppeteer.launch({
      executablePath: opts.chromium, headless: true, userDataDir, protocolTimeout: opts.timeoutMs + 15000,
      defaultViewport: { width: opts.width, height: opts.height, deviceScaleFactor: 1 },
      args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--password-store=basic', `--window-size=${opts.width},${opts.height}`],
    });
    const page = await browser.newPage();
    page.setDefaultTimeout(opts.timeoutMs);
    page.on('pageerror', (error) => dump.page_errors.push(String(error && error.message ? error.message : error)));
    page.on('console', (message) => { if (message.type() === 'error') dump.console_errors.push(message.text()); });
    page.on('response', (response) => {
      if (response.status() >= 400) dump.request_failures.push({ url: response.url(), status: response.status() });
    });
    page.on('requestfailed', (request) => dump.request_failures.push({ url: request.url(), error: request.failure() ? request.failure().errorText : 'failed' }));

    let response;
    try {
      response = await page.goto(opts.url, { waitUntil: 'load' });
    } catch (error) {
      dump.fatal = `could not open ${opts.url}: ${error.message}`;
      write();
      await browser.close();
      process.exit(2);
    }
    dump.status = response ? response.status() : null;
    dump.timings_ms.goto = Date.now() - started;
    for (const [selector, value] of opts.fills) {
      const field = await page.$(selector);
      if (!field) { dump.harness_errors.push(`nothing to fill at ${selector}`); continue; }
      await field.type(value);
    }
    if (opts.click) {
      const target = await page.$(opts.click);
      if (!target) {
        dump.harness_errors.push(`nothing to click at ${opts.click}`);
      } else {
        const [navigation] = await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), target.click()]);
        dump.status = navigation ? navigation.status() : null;
        dump.clicked = opts.click;
      }
    }
    // Every image decoded (or failed) before the dump and the screenshot.
    await page.evaluate(() => Promise.all([...document.images].map((img) => (img.complete ? null : img.decode().catch(() => null)))));
    Object.assign(dump, await page.evaluate(pageDump));
    dump.final_url = page.url();
    await page.screenshot({ path: opts.screenshot, fullPage: true });
    dump.screenshot = path.resolve(opts.screenshot);
  } finally {
    dump.timings_ms.total = Date.now() - started;
    if (!dump.fatal) write();
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
    clearTimeout(watchdog);
  }
}

main().catch((error) => { console.error(error && error.stack ? error.stack : error); process.exit(1); });
