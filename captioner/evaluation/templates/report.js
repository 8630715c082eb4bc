(function () {
  var gallery = document.getElementById('gallery');
  var select = document.getElementById('sort-key');
  function value(card, key) { var v = parseFloat(card.getAttribute(key)); return isNaN(v) ? 0 : v; }
  function sortCards(key, dir) {
    var cards = Array.prototype.slice.call(gallery.querySelectorAll('.card'));
    cards.sort(function (a, b) {
      var d = value(a, key) - value(b, key);
      return d !== 0 ? dir * d : value(a, 'data-order') - value(b, 'data-order');
    });
    cards.forEach(function (card) { gallery.appendChild(card); });
    gallery.setAttribute('data-sorted', key + ':' + (dir > 0 ? 'asc' : 'desc'));
  }
  document.getElementById('sort-desc').addEventListener('click', function () { sortCards(select.value, -1); });
  document.getElementById('sort-asc').addEventListener('click', function () { sortCards(select.value, 1); });
  select.addEventListener('change', function () { sortCards(select.value, select.value === 'data-order' ? 1 : -1); });
  var m = /^#sort=([A-Za-z0-9-]+):(asc|desc)$/.exec(window.location.hash);
  if (m) { select.value = 'data-' + m[1]; sortCards('data-' + m[1], m[2] === 'asc' ? 1 : -1); }
  document.body.setAttribute('data-ready', '1');
})();
