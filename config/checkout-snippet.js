/*
 * Faurya Relay checkout snippet: a "Buy" button that creates the Polar checkout through the
 * relay's checkout endpoint ([checkout] in relay.toml) with the visitor's Faurya IDs, then
 * sends the browser to Polar's checkout page. No dependencies; any browser with fetch.
 *
 *   <button data-faurya-checkout data-plan="pro"
 *           data-endpoint="https://relay.example.com/checkout">Buy Pro</button>
 *   <script src="/js/checkout-snippet.js" defer></script>
 *
 * Instead of data-endpoint / data-plan on each button, set defaults once, before the script:
 *
 *   <script>window.FauryaCheckout = { endpoint: "https://relay.example.com/checkout", plan: "pro" };</script>
 *
 * It posts {plan, faVisitorId, faSessionId, faAttributionToken}: the IDs are read from
 * window.__FAURYA_VISITOR_ID__, __FAURYA_SESSION_ID__ and __FAURYA_ATTRIBUTION_TOKEN__ when the
 * button is clicked (null when absent). The relay answers {url, orderId}; the browser goes to
 * url. On failure the button is enabled again, the reason goes to the console, and a
 * "faurya-checkout-error" event (detail: {message}) bubbles from the button, for the page to
 * show a message.
 *
 * Polar checkout links (no relay endpoint needed) copy only `reference_id` and `utm_*` query
 * parameters into the order's metadata. Mark such a link and the snippet adds the visitor's
 * attribution token as `reference_id` when it is clicked (the shipped relay.toml reads it as
 * faAttributionToken when the metadata has none):
 *
 *   <a data-faurya-checkout-link href="https://buy.polar.sh/polar_cl_...">Buy</a>
 */
(function () {
  "use strict";

  var BUTTONS = "[data-faurya-checkout]";

  function settings() {
    var given = window.FauryaCheckout;
    return given && typeof given === "object" ? given : {};
  }

  function fauryaId(name) {
    var value = window[name];
    return typeof value === "string" ? value : null;
  }

  function fail(button, message) {
    console.error("[faurya-checkout] " + message);
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.dispatchEvent(
      new CustomEvent("faurya-checkout-error", { bubbles: true, detail: { message: message } })
    );
  }

  function answerOf(response) {
    return response
      .json()
      .catch(function () {
        return {};
      })
      .then(function (body) {
        if (!response.ok) {
          throw new Error((body && body.error) || "the relay answered " + response.status);
        }
        // Only ever navigate to a web page: never a javascript: or data: URL.
        if (!body || typeof body.url !== "string" || !/^https?:\/\//i.test(body.url)) {
          throw new Error("the relay's answer has no checkout url");
        }
        return body;
      });
  }

  function start(button) {
    var defaults = settings();
    var endpoint = button.getAttribute("data-endpoint") || defaults.endpoint;
    var plan = button.getAttribute("data-plan") || defaults.plan;
    if (!endpoint || !plan) {
      fail(button, "set data-endpoint and data-plan on the button (or window.FauryaCheckout)");
      return;
    }
    button.disabled = true; // one checkout per click, however impatient the visitor
    button.setAttribute("aria-busy", "true");
    fetch(endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      credentials: "omit",
      body: JSON.stringify({
        plan: plan,
        faVisitorId: fauryaId("__FAURYA_VISITOR_ID__"),
        faSessionId: fauryaId("__FAURYA_SESSION_ID__"),
        faAttributionToken: fauryaId("__FAURYA_ATTRIBUTION_TOKEN__"),
      }),
    })
      .then(answerOf)
      .then(function (body) {
        window.location.assign(body.url);
      })
      .catch(function (error) {
        fail(button, (error && error.message) || String(error));
      });
  }

  var LINKS = "a[data-faurya-checkout-link]";
  var MAX_METADATA_CHARS = 500; // Polar refuses longer metadata values (and empty ones)

  // A checkout link carries the attribution token in reference_id; a link that already has a
  // reference_id of the merchant's keeps it.
  function decorate(link) {
    var token = fauryaId("__FAURYA_ATTRIBUTION_TOKEN__");
    if (!token || token.length > MAX_METADATA_CHARS) {
      return;
    }
    try {
      var url = new URL(link.href, window.location.href);
      if (!url.searchParams.has("reference_id")) {
        url.searchParams.set("reference_id", token);
        link.href = url.toString();
      }
    } catch (error) {
      console.error("[faurya-checkout] not a URL: " + link.href);
    }
  }

  // One listener for the whole page: buttons added later work too.
  document.addEventListener("click", function (event) {
    var link = event.target && event.target.closest ? event.target.closest(LINKS) : null;
    if (link) {
      decorate(link); // then the browser follows the (now decorated) link
      return;
    }
    var button = event.target && event.target.closest ? event.target.closest(BUTTONS) : null;
    if (!button) {
      return;
    }
    event.preventDefault();
    if (button.disabled || button.getAttribute("aria-busy") === "true") {
      return; // a link has no disabled state: aria-busy marks a checkout under way
    }
    start(button);
  });
})();
