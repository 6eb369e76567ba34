// Drives the dashboard in headless Chromium: log in (a wrong token first),
// see a function, invoke it, watch the invocation appear with its log
// lines, in the list and in the live tail, and open its span timeline.
// Saves screenshots.
//
//   node dashboard.mjs ADMIN_URL TOKEN SCREENSHOT_DIR FUNCTION
import { chromium } from "playwright-core";

const [adminUrl, token, shots, fn] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(20_000);
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().includes("401")) problems.push(`console: ${m.text()}`);
  });

  await page.goto(`${adminUrl}/ui`);
  await page.fill("#token", "not-the-token");
  await page.click("#login");
  await page.waitForSelector("#login-error:has-text('refused')");
  await page.screenshot({ path: `${shots}/1-login-refused.png` });

  await page.fill("#token", token);
  await page.click("#login");
  const row = `tr[data-function="${fn}"]`;
  await page.waitForSelector(row);
  await page.screenshot({ path: `${shots}/2-functions.png` });

  await page.click(row);
  await page.fill("#invoke-path", "/t/print?lines=3");
  await page.click("#invoke");
  const handle = await page.waitForFunction(() => document.querySelector("#invoke-result")?.dataset.id);
  const id = await handle.jsonValue();
  await page.waitForSelector(`.invocation[data-id="${id}"] pre:has-text("line 2 from the testbed")`);
  await page.waitForSelector(`#tail:has-text("line 2 from the testbed")`);
  // Its spans: the invocation, admission, instantiation, execution.
  await page.click(`.invocation[data-id="${id}"] header`);
  for (const step of ["admission", "instantiate", "execute"]) {
    await page.waitForSelector(`.invocation[data-id="${id}"] .span-row[data-name="${step}"]`);
  }
  await page.waitForSelector("#versions:has-text('v1 (active)')");
  // It ran, so its code is in memory.
  await page.waitForSelector(`${row} .state:has-text('in memory')`);
  // The functions table counts it once the next sample is in.
  await page.waitForFunction((sel) => {
    const cells = document.querySelector(sel)?.cells;
    return cells && cells[4].textContent !== "–";
  }, row);
  await page.screenshot({ path: `${shots}/3-invocation.png`, fullPage: true });
  console.log(JSON.stringify({ ok: problems.length === 0, invocation: id, problems }));
} finally {
  await browser.close();
}
if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
