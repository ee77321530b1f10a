// The search page's behaviour. window.vclrSettings comes from settings.js, which the service writes for its index:
// an example query from the collection, the query bounds, whether the index has captions.
const settings = window.vclrSettings;
const $ = (id) => document.getElementById(id);
const results = $("results"), status = $("status"), box = $("query");
const k = () => $("k").value;
box.placeholder = settings.placeholder; box.maxLength = settings.max_chars; $("k").max = settings.max_k;
if (settings.has_captions) $("caption-choice").textContent = " (unticked: the captions that match it)";
function say(text, kind) { status.textContent = text; status.className = kind || ""; }
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
function scoreLine(hit) {
  const line = el("div", "score", `#${hit.rank} · score ${hit.score.toFixed(3)}`);
  if (hit.weak) { line.append(" "); line.append(el("span", "badge", "weak match")); }
  return line;
}
// what the form asks besides the text, as the address bar and the API name it
const FIELDS = ["not", "folder", "after", "before", "sort", "distinct"];
const API_NAME = {not: "not_text", folder: "folder", after: "after", before: "before", sort: "sort",
                  distinct: "distinct"};
let page = null;  // the query on screen and how many of its hits are shown: "more results" asks for the next ones
async function show(request, what, append = false) {
  say("searching…");
  if (!append) results.replaceChildren();
  let response, body;
  try { response = await request; body = await response.json(); }
  catch (error) { say("the search service did not answer: " + error, "error"); return; }
  if (response.status === 401) {  // the service needs a key: kept in a cookie, which <img> requests carry too
    const key = window.prompt("This search service needs an API key:");
    if (key) { document.cookie = `vclr_key=${encodeURIComponent(key)}; path=/; SameSite=Strict`; fromAddress(false); }
    else say(body.error, "error");
    return;
  }
  if (!response.ok) { say(body.error, "error"); return; }
  if (!append) results.className = body.hits.length && body.hits[0].kind === "caption" ? "captions" : "";
  for (const hit of body.hits) {
    const item = el("li", "hit" + (hit.weak ? " weak" : ""));
    if (hit.kind === "image") {
      const img = el("img"), like = el("button", "like", "more like this");
      img.src = hit.url; img.alt = hit.caption || hit.value; img.loading = "lazy";
      like.type = "button"; like.setAttribute("aria-label", `more images like ${hit.value}`);
      like.addEventListener("click", () => search({like: hit.id}));
      item.append(img, el("div", "name", hit.value));
      if (hit.caption) item.append(el("div", "caption", hit.caption));
      if (hit.words) item.append(el("div", "words", `text: ${hit.words}`));
      item.append(scoreLine(hit), like);
    } else {
      item.append(el("div", "caption", hit.value), scoreLine(hit));
    }
    if (hit.taken) item.append(el("div", "score", `taken ${hit.taken.slice(0, 10)}`));
    results.append(item);
  }
  $("more").hidden = !(page && body.hits.length === Number(k()));
  if (page) page.shown += body.hits.length;
  if (!body.hits.length) say(append ? "no more results" : "no results");
  else if (body.hits.every((hit) => hit.weak))
    say(`No strong match for ${what}: every result scores no better than queries about things this ` +
        "collection does not hold.", "weak");
  else say(`${body.hits.length} results for ${what}`);
}
function apiParams(params, offset) {
  const api = new URLSearchParams({text: params.q, k: k()});
  for (const field of FIELDS) if (params[field]) api.append(API_NAME[field], params[field]);
  if (offset) api.append("offset", offset);
  return api;
}
function search(params, push = true) {
  if (push) history.pushState(params, "", "?" + new URLSearchParams(params));
  page = null; $("more").hidden = true;
  if (params.q !== undefined) {
    box.value = params.q;
    for (const field of FIELDS) $(field).value = params[field] || (field === "sort" ? "relevance" : "");
    if (!params.q.trim()) {
      results.replaceChildren(); say("Type what you are looking for, or drop an image.", "error"); return;
    }
    page = {params, shown: 0};
    show(fetch("api/search?" + apiParams(params, 0)), `“${params.q.trim()}”`);
  } else if (params.like !== undefined) {
    show(fetch(`api/like/${params.like}?k=${k()}`), `images like #${params.like}`);
  }
}
function formParams() {
  const params = {q: box.value};
  for (const field of FIELDS) if ($(field).value && !(field === "sort" && $(field).value === "relevance"))
    params[field] = $(field).value;
  return params;
}
function fromAddress(push) {
  const address = new URLSearchParams(location.search);
  if (address.has("k")) $("k").value = address.get("k");
  if (address.has("q")) {
    const params = {q: address.get("q")};
    for (const field of FIELDS) if (address.has(field)) params[field] = address.get(field);
    search(params, push);
  }
  else if (address.has("like")) search({like: address.get("like")}, push);
  else { results.replaceChildren(); say(""); }
}
function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { say(`${file.name} is not an image`, "error"); return; }
  const data = new FormData(); data.append("file", file);
  const images = $("want-images").checked;
  history.pushState({}, "", location.pathname);
  show(fetch(`api/search/image?k=${k()}&images=${images}`, {method: "POST", body: data}), file.name);
}
$("search").addEventListener("submit", (event) => { event.preventDefault(); search(formParams()); });
$("more").addEventListener("click", () => {
  if (page) show(fetch("api/search?" + apiParams(page.params, page.shown)), `“${page.params.q.trim()}”`, true);
});
$("upload").addEventListener("change", (event) => searchImage(event.target.files[0]));
const drop = $("drop");
for (const name of ["dragenter", "dragover"])
  document.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) drop.classList.remove("over"); });
document.addEventListener("drop", (event) => {
  event.preventDefault(); drop.classList.remove("over");
  searchImage(event.dataTransfer.files[0]);
});
document.addEventListener("keydown", (event) => {  // "/" jumps to the search box, as on most search pages
  if (event.key === "/" && document.activeElement !== box) { event.preventDefault(); box.focus(); }
});
window.addEventListener("popstate", () => fromAddress(false));
fromAddress(false);
