#!/usr/bin/env node
// Open OHIF v3 in headless Chromium (puppeteer-core + Debian /usr/bin/chromium), wait for it to
// show what the URL asks for, and dump what it shows as JSON, with screenshots.
//
//   node drive.mjs --url URL --screenshot PAGE.png --out DUMP.json
//                  [--wait-for image|seg|sr] [--timeout-ms 60000] [--settle-ms 1500]
//                  [--panel segmentation|measurements] [--window 1400x1000]
//                  [--chromium /usr/bin/chromium] [--user-data-dir DIR] [--open-series SERIES_UID]
//
// --open-series: wait for the study's first image, then double-click that series' thumbnail in the
// study browser (as a user opens a SEG or SR), then wait for --wait-for.
// --wait-for: image = a viewport displays an image; seg = a segmentation is hydrated and its
// labelmap images are in the cache; sr = the measurement service holds measurements. A wait ends
// early 3 s after the first page error or console.error of a JavaScript error ("TypeError: ...",
// how OHIF's error boundaries report a crashed route, which never gets ready). A wait that runs out
// is not an error: "timed_out" is true in the dump. Exit status 0 once the dump is written,
// 2 when the page could not be opened at all (the dump then has "fatal").
//
// Dump keys:
//   url, final_url, wait_for, ready, timed_out, timings_ms {goto, ready, total},
//   page_errors [str]          uncaught exceptions / unhandled rejections in the page
//   console_errors [str]       console.error lines; console_warnings [str] the same for warnings
//   request_failures [{url, status|error}]   HTTP >= 400 and failed requests
//   image_load_errors [{type, image_id, error}]  cornerstone IMAGE_LOAD_ERROR / IMAGE_LOAD_FAILED events
//   body_text                  document.body.innerText (first 4000 characters)
//   viewports [{viewport_id, type, image_id, canvas_rect {x,y,width,height} (CSS px = screenshot px),
//               image_size [columns, rows], image_rect {x,y,width,height} (where the image's pixel
//               grid lies in the screenshot), image_to_page {origin [x,y], column_step [dx,dy],
//               row_step [dx,dy]} (page position = origin + col*column_step + row*row_step)}]
//   segmentations [{segmentation_id, label, viewport_ids, labelmap {image_ids, width, height,
//                   frames, dtype}, segments [{segment_index, label, color [r,g,b,a] | null,
//                   pixel_count, bbox {x_min, x_max, y_min, y_max} | null, centroid {x, y} | null,
//                   frames_with_pixels [int]}]}]   (image pixel coordinates of the labelmap)
//   measurements [{label, tool_name, type, display_text {primary, secondary}, points_count}]
//   panel {name, opened, text, rows [{title, color, text}]} | null
//   screenshot, viewport_screenshot   paths written (the latter: first viewport's canvas)
//   fatal (only when exit status is 2)

import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

function parseArgs(argv) {
  const opts = {
    waitFor: 'image', timeoutMs: 60000, settleMs: 1500, panel: null, window: '1400x1000',
    chromium: '/usr/bin/chromium', userDataDir: null, openSeries: null,
  };
  const names = {
    '--url': 'url', '--screenshot': 'screenshot', '--out': 'out', '--wait-for': 'waitFor',
    '--timeout-ms': 'timeoutMs', '--settle-ms': 'settleMs', '--panel': 'panel', '--window': 'window',
    '--chromium': 'chromium', '--user-data-dir': 'userDataDir', '--open-series': 'openSeries',
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) throw new Error(`bad argument ${argv[i]}`);
    opts[key] = argv[i + 1];
  }
  for (const required of ['url', 'screenshot', 'out']) {
    if (!opts[required]) throw new Error(`--${required} is required`);
  }
  opts.timeoutMs = Number(opts.timeoutMs);
  opts.settleMs = Number(opts.settleMs);
  if (!['image', 'seg', 'sr'].includes(opts.waitFor)) throw new Error(`--wait-for ${opts.waitFor}?`);
  if (opts.panel && !['segmentation', 'measurements'].includes(opts.panel)) throw new Error(`--panel ${opts.panel}?`);
  const [w, h] = opts.window.split('x').map(Number);
  opts.width = w; opts.height = h;
  return opts;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const clip = (text, n = 600) => (text.length > n ? `${text.slice(0, n)}...` : text);
const JS_ERROR = /^(Uncaught )?(\w*Error|Error)\b/;
const PANEL_BUTTONS = { segmentation: 'panelSegmentation-btn', measurements: 'trackedMeasurements-btn' };

// ---- functions evaluated in the page -------------------------------------------------------

function pageReadiness(waitFor) {
  const cs = window.cornerstone;
  const tools = window.cornerstoneTools;
  if (cs && cs.eventTarget && !window.__cxrnodeImageErrors) {
    // Which image failed, and why (OHIF's own IMAGE_LOAD_ERROR listener only says "handler is not a function").
    window.__cxrnodeImageErrors = [];
    for (const type of ['IMAGE_LOAD_ERROR', 'IMAGE_LOAD_FAILED']) {
      cs.eventTarget.addEventListener(type, (event) => {
        const d = event.detail || {};
        const e = d.error;
        window.__cxrnodeImageErrors.push({ type, image_id: d.imageId || null,
          error: e ? String(e.message || (e.error && e.error.message) || e.status || JSON.stringify(e)).slice(0, 400) : null });
      });
    }
  }
  if (!cs || !cs.getEnabledElements) return { ready: false, why: 'no cornerstone yet' };
  let imageShown = false;
  for (const element of cs.getEnabledElements()) {
    const vp = element.viewport;
    try {
      const id = vp.getCurrentImageId && vp.getCurrentImageId();
      if (id && cs.cache.getImage(id) && (!vp.getImageData || vp.getImageData())) imageShown = true;
    } catch (e) { /* not ready */ }
  }
  if (!imageShown) return { ready: false, why: 'no image displayed' };
  if (waitFor === 'image') return { ready: true };
  if (waitFor === 'seg') {
    const segs = tools && tools.segmentation ? tools.segmentation.state.getSegmentations() : [];
    if (!segs.length) return { ready: false, why: 'no segmentation' };
    for (const seg of segs) {
      const ids = (seg.representationData.Labelmap || {}).imageIds || [];
      if (!ids.length || !ids.every((id) => cs.cache.getImage(id))) return { ready: false, why: 'labelmap not cached' };
    }
    return { ready: true };
  }
  const ms = window.services && window.services.measurementService;
  if (ms && ms.getMeasurements().length) return { ready: true };
  return { ready: false, why: 'no measurements' };
}

function pageDump() {
  const cs = window.cornerstone;
  const tools = window.cornerstoneTools;
  const rect = (r) => ({ x: r.x, y: r.y, width: r.width, height: r.height });
  const out = { viewports: [], segmentations: [], measurements: [], errors: [], image_load_errors: window.__cxrnodeImageErrors || [] };
  const enabled = cs && cs.getEnabledElements ? cs.getEnabledElements() : [];
  for (const element of enabled) {
    const vp = element.viewport;
    const info = { viewport_id: element.viewportId, type: vp.type, image_id: null, canvas_rect: rect(vp.canvas.getBoundingClientRect()) };
    try {
      const id = vp.getCurrentImageId && vp.getCurrentImageId();
      info.image_id = id || null;
      const image = id && cs.cache.getImage(id);
      if (image) {
        info.image_size = [image.columns, image.rows];
        const toPage = (col, row) => {
          const world = cs.utilities.imageToWorldCoords(id, [col, row]);
          const [x, y] = vp.worldToCanvas(world);
          return [info.canvas_rect.x + x, info.canvas_rect.y + y];
        };
        const o = toPage(0, 0); const c = toPage(1, 0); const r = toPage(0, 1); const end = toPage(image.columns, image.rows);
        info.image_to_page = { origin: o, column_step: [c[0] - o[0], c[1] - o[1]], row_step: [r[0] - o[0], r[1] - o[1]] };
        const xs = [o[0], end[0]]; const ys = [o[1], end[1]];
        info.image_rect = { x: Math.min(...xs), y: Math.min(...ys), width: Math.abs(xs[1] - xs[0]), height: Math.abs(ys[1] - ys[0]) };
      }
    } catch (e) { out.errors.push(`viewport ${element.viewportId}: ${e}`); }
    out.viewports.push(info);
  }
  if (tools && tools.segmentation) {
    for (const seg of tools.segmentation.state.getSegmentations()) {
      const entry = { segmentation_id: seg.segmentationId, label: seg.label, viewport_ids: [], labelmap: null, segments: [] };
      try { entry.viewport_ids = tools.segmentation.state.getViewportIdsWithSegmentation(seg.segmentationId); } catch (e) { /* older API */ }
      const ids = (seg.representationData.Labelmap || {}).imageIds || [];
      const stats = {};
      let width = null; let height = null; let dtype = null;
      ids.forEach((id, frame) => {
        const image = cs.cache.getImage(id);
        if (!image) { out.errors.push(`labelmap image ${id} not in cache`); return; }
        const px = image.getPixelData ? image.getPixelData() : image.voxelManager.getScalarData();
        width = image.columns; height = image.rows; dtype = px.constructor.name;
        for (let i = 0; i < px.length; i += 1) {
          const v = px[i];
          if (!v) continue;
          const x = i % width; const y = (i - x) / width;
          let s = stats[v];
          if (!s) { s = stats[v] = { n: 0, sx: 0, sy: 0, x0: x, x1: x, y0: y, y1: y, frames: new Set() }; }
          s.n += 1; s.sx += x; s.sy += y;
          if (x < s.x0) s.x0 = x; if (x > s.x1) s.x1 = x; if (y < s.y0) s.y0 = y; if (y > s.y1) s.y1 = y;
          s.frames.add(frame);
        }
      });
      entry.labelmap = { image_ids: ids, width, height, frames: ids.length, dtype };
      const indices = new Set([...Object.keys(seg.segments || {}).map(Number), ...Object.keys(stats).map(Number)]);
      for (const index of [...indices].sort((a, b) => a - b)) {
        const s = stats[index];
        const meta = (seg.segments || {})[index] || {};
        let color = null;
        for (const viewportId of [...entry.viewport_ids, ...enabled.map((e) => e.viewportId)]) {
          try {
            const c = tools.segmentation.config.color.getSegmentIndexColor(viewportId, seg.segmentationId, index);
            if (c) { color = Array.from(c); break; }
          } catch (e) { /* not shown in this viewport */ }
        }
        entry.segments.push({
          segment_index: index, label: meta.label ?? null, color, pixel_count: s ? s.n : 0,
          bbox: s ? { x_min: s.x0, x_max: s.x1, y_min: s.y0, y_max: s.y1 } : null,
          centroid: s ? { x: s.sx / s.n, y: s.sy / s.n } : null,
          frames_with_pixels: s ? [...s.frames].sort((a, b) => a - b) : [],
        });
      }
      out.segmentations.push(entry);
    }
  }
  const ms = window.services && window.services.measurementService;
  if (ms) {
    for (const m of ms.getMeasurements()) {
      out.measurements.push({
        label: m.label ?? null, tool_name: m.toolName ?? null, type: m.type ?? null,
        display_text: m.displayText ?? null, points_count: Array.isArray(m.points) ? m.points.length : null,
      });
    }
  }
  return out;
}

function pagePanel(name) {
  // The right-hand side panel: walk up from its header until the next level holds the study browser.
  let root = document.querySelector('[data-cy="side-panel-header-right"]');
  while (root && root.parentElement && !root.parentElement.querySelector('[data-cy="studyBrowser-panel"]')) root = root.parentElement;
  if (!root) return null;
  const rows = [...root.querySelectorAll('[data-cy="data-row"]')].map((row) => {
    const title = row.querySelector('[data-cy="data-row-title"]');
    const swatch = row.querySelector('[data-cy="data-row-colorhex"]');
    return { title: title ? title.innerText : null, color: swatch ? getComputedStyle(swatch).backgroundColor : null, text: row.innerText };
  });
  const inner = name === 'measurements' ? root.querySelector('[data-cy="trackedMeasurements-panel"]') : null;
  return { name, text: (inner || root).innerText, rows };
}

// ---- main ----------------------------------------------------------------------------------

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const started = Date.now();
  const watchdog = setTimeout(() => { console.error('drive.mjs: watchdog expired'); process.exit(3); }, opts.timeoutMs + 60000);
  const dump = {
    url: opts.url, final_url: null, wait_for: opts.waitFor, ready: false, timed_out: false,
    timings_ms: {}, page_errors: [], console_errors: [], console_warnings: [], request_failures: [], image_load_errors: [],
    body_text: null, viewports: [], segmentations: [], measurements: [], panel: null,
    screenshot: null, viewport_screenshot: null, harness_errors: [], opened_series: null,
  };
  const write = () => fs.writeFileSync(opts.out, JSON.stringify(dump, null, 1));
  const userDataDir = opts.userDataDir || fs.mkdtempSync(path.join(path.dirname(path.resolve(opts.out)), 'profile-'));
  let browser;
  try {
    browser = await puppeteer.launch({
      executablePath: opts.chromium, headless: true, userDataDir, protocolTimeout: opts.timeoutMs + 30000,
      defaultViewport: { width: opts.width, height: opts.height, deviceScaleFactor: 1 },
      args: ['--no-sandbox', '--disable-gpu', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
        '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update',
        '--disable-sync', `--window-size=${opts.width},${opts.height}`],
    });
    const page = await browser.newPage();
    let firstPageErrorAt = null;
    page.on('pageerror', (error) => {
      dump.page_errors.push(clip(String(error && error.stack ? `${error.message}\n${error.stack}` : error), 2000));
      if (firstPageErrorAt === null) firstPageErrorAt = Date.now();
    });
    page.on('console', (message) => {
      const list = message.type() === 'error' ? dump.console_errors : message.type() === 'warn' ? dump.console_warnings : null;
      if (list && list.length < 200) list.push(clip(message.text()));
      // OHIF's error boundaries report a crashed route with console.error(TypeError: ...), not as a page error.
      if (message.type() === 'error' && JS_ERROR.test(message.text()) && firstPageErrorAt === null) firstPageErrorAt = Date.now();
    });
    page.on('response', (response) => {
      if (response.status() >= 400 && dump.request_failures.length < 200) dump.request_failures.push({ url: response.url(), status: response.status() });
    });
    page.on('requestfailed', (request) => {
      const error = request.failure() ? request.failure().errorText : 'failed';
      if (error !== 'net::ERR_ABORTED' && dump.request_failures.length < 200) dump.request_failures.push({ url: request.url(), error });
    });

    try {
      await page.goto(opts.url, { waitUntil: 'domcontentloaded', timeout: opts.timeoutMs });
    } catch (error) {
      dump.fatal = `could not open ${opts.url}: ${error.message}`;
      dump.timings_ms.total = Date.now() - started;
      write();
      await browser.close();
      process.exit(2);
    }
    dump.timings_ms.goto = Date.now() - started;

    const deadline = started + opts.timeoutMs;
    let last = null;
    const waitUntilReady = async (what) => {
      while (Date.now() < deadline) {
        try { last = await page.evaluate(pageReadiness, what); } catch (error) { last = { ready: false, why: String(error) }; }
        if (last.ready) return true;
        if (firstPageErrorAt !== null && Date.now() - firstPageErrorAt > 3000) return false;
        await sleep(250);
      }
      return false;
    };
    if (opts.openSeries) {
      // As a radiologist does: the study opens on its radiograph, then the series is double-clicked
      // in the study browser (its thumbnail's id is "thumbnail-<displaySetInstanceUID>").
      if (await waitUntilReady('image')) {
        const displaySet = await page.evaluate((uid) => {
          const found = window.services.displaySetService.getActiveDisplaySets().find((d) => d.SeriesInstanceUID === uid);
          return found ? found.displaySetInstanceUID : null;
        }, opts.openSeries);
        const thumbnail = displaySet ? await page.$(`[id="thumbnail-${displaySet}"]`) : null;
        if (thumbnail) {
          await thumbnail.click({ count: 2 });
          dump.opened_series = opts.openSeries;
        } else {
          dump.harness_errors.push(`no study-browser thumbnail for series ${opts.openSeries}`);
        }
        await waitUntilReady(opts.waitFor);
      }
    } else {
      await waitUntilReady(opts.waitFor);
    }
    dump.ready = Boolean(last && last.ready);
    dump.timed_out = !dump.ready && Date.now() >= deadline;
    dump.not_ready_because = dump.ready ? null : (last && last.why) || null;
    dump.timings_ms.ready = Date.now() - started;

    if (opts.panel) {
      const selector = `[data-cy="${PANEL_BUTTONS[opts.panel]}"]`;
      const button = await page.$(selector);
      if (button) {
        await button.click();
      } else {
        dump.harness_errors.push(`panel button ${selector} not found`);
      }
    }
    await sleep(opts.settleMs);

    try {
      Object.assign(dump, await page.evaluate(pageDump));
      dump.harness_errors.push(...dump.errors);
      delete dump.errors;
    } catch (error) { dump.harness_errors.push(`dump: ${error.message}`); }
    try { dump.panel = await page.evaluate(pagePanel, opts.panel || 'right'); } catch (error) { dump.harness_errors.push(`panel: ${error.message}`); }
    if (dump.panel) dump.panel.opened = Boolean(opts.panel);
    try { dump.body_text = clip(await page.evaluate(() => document.body.innerText), 4000); } catch (error) { dump.harness_errors.push(`body: ${error.message}`); }
    dump.final_url = page.url();

    await page.screenshot({ path: opts.screenshot });
    dump.screenshot = path.resolve(opts.screenshot);
    const canvas = dump.viewports.length ? dump.viewports[0].canvas_rect : null;
    if (canvas && canvas.width > 0 && canvas.height > 0) {
      const viewportShot = opts.screenshot.replace(/\.png$/i, '') + '.viewport.png';
      await page.screenshot({ path: viewportShot, clip: { x: canvas.x, y: canvas.y, width: canvas.width, height: canvas.height } });
      dump.viewport_screenshot = path.resolve(viewportShot);
    }
  } finally {
    dump.timings_ms.total = Date.now() - started;
    if (!dump.fatal) write();
    if (browser) await browser.close().catch(() => {});
    if (!opts.userDataDir) fs.rmSync(userDataDir, { recursive: true, force: true });
    clearTimeout(watchdog);
  }
}

main().catch((error) => { console.error(error && error.stack ? error.stack : error); process.exit(1); });
