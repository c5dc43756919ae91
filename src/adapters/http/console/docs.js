// Renders /openapi.json as a readable reference: operations grouped by tag, their parameters,
// bodies and responses, and the schemas they use. Built with DOM calls only: no text is ever parsed as HTML.

const METHODS = ['get', 'post', 'put', 'patch', 'delete'];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === 'class') node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function refName(ref) {
  return ref.split('/').pop();
}

/** A one-line type description of a schema: `string`, `[CommandResponse]`, `integer | null`. */
function typeOf(schema) {
  if (!schema) return '';
  if (schema.$ref) return refName(schema.$ref);
  if (schema.oneOf || schema.anyOf) return (schema.oneOf || schema.anyOf).map(typeOf).join(' | ');
  if (schema.allOf) return schema.allOf.map(typeOf).join(' & ');
  const types = Array.isArray(schema.type) ? schema.type : [schema.type || 'object'];
  return types
    .map((type) => {
      if (type === 'array') return `[${typeOf(schema.items)}]`;
      if (type === 'object' && schema.additionalProperties) return `map of ${typeOf(schema.additionalProperties)}`;
      return schema.format ? `${type} (${schema.format})` : type;
    })
    .join(' | ');
}

function schemaLink(schema) {
  const ref = schema?.$ref || schema?.items?.$ref;
  const text = typeOf(schema);
  return ref ? el('a', { href: `#schema-${refName(ref)}` }, text) : el('code', {}, text);
}

function propertiesTable(schema) {
  const props = Object.entries(schema.properties || {});
  if (props.length === 0) return el('p', { class: 'help' }, typeOf(schema));
  const required = new Set(schema.required || []);
  return el(
    'table',
    {},
    el('thead', {}, el('tr', {}, el('th', {}, 'Field'), el('th', {}, 'Type'), el('th', {}, 'Description'))),
    el(
      'tbody',
      {},
      props.map(([name, prop]) =>
        el(
          'tr',
          {},
          el('td', {}, el('code', {}, name), required.has(name) ? ' *' : ''),
          el('td', {}, schemaLink(prop)),
          el('td', {}, prop.description || ''),
        ),
      ),
    ),
  );
}

function operation(path, method, op) {
  const id = `op-${method}-${path.replace(/[^a-zA-Z0-9]+/g, '-')}`;
  const body = el('div', { class: 'body' });
  if (op.description && op.description !== op.summary) body.append(el('p', {}, op.description));
  const security = op.security || [];
  if (security.length) {
    const ways = security.map((s) => Object.keys(s)[0] || 'none').join(', ');
    body.append(el('p', { class: 'help' }, `Authentication: ${ways}`));
  }
  if (op.parameters?.length) {
    body.append(
      el('h4', {}, 'Parameters'),
      el(
        'table',
        {},
        el('thead', {}, el('tr', {}, el('th', {}, 'Name'), el('th', {}, 'In'), el('th', {}, 'Type'), el('th', {}, 'Description'))),
        el(
          'tbody',
          {},
          op.parameters.map((p) =>
            el(
              'tr',
              {},
              el('td', {}, el('code', {}, p.name), p.required ? ' *' : ''),
              el('td', {}, p.in),
              el('td', {}, schemaLink(p.schema)),
              el('td', {}, p.description || ''),
            ),
          ),
        ),
      ),
    );
  }
  const requestBody = op.requestBody?.content;
  if (requestBody) {
    body.append(el('h4', {}, 'Request body'));
    for (const [type, media] of Object.entries(requestBody)) {
      body.append(el('p', {}, el('code', {}, type), ' ', schemaLink(media.schema)));
    }
  }
  body.append(el('h4', {}, 'Responses'));
  body.append(
    el(
      'ul',
      {},
      Object.entries(op.responses || {}).map(([status, response]) => {
        const content = Object.entries(response.content || {});
        return el(
          'li',
          {},
          el('strong', {}, status),
          ' ',
          response.description || '',
          content.map(([type, media]) => el('span', {}, ' — ', el('code', {}, type), ' ', media.schema ? schemaLink(media.schema) : '')),
        );
      }),
    ),
  );
  return el(
    'details',
    { class: 'op', id },
    el('summary', {}, el('span', { class: `method ${method}` }, method), el('span', { class: 'path' }, path), el('span', { class: 'help' }, op.summary || '')),
    body,
  );
}

async function render() {
  const response = await fetch('/openapi.json');
  if (!response.ok) throw new Error(`GET /openapi.json answered ${response.status}`);
  const spec = await response.json();
  document.title = `${spec.info.title} ${spec.info.version} API reference`;
  const intro = document.getElementById('docs-intro');
  intro.textContent = `${spec.info.title} ${spec.info.version} · OpenAPI ${spec.openapi}. ${spec.info.description || ''} Send keys as "Authorization: Bearer <key>" or "X-API-Key: <key>".`;

  const byTag = new Map();
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || 'other';
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push({ path, method, op });
    }
  }
  const toc = document.getElementById('toc');
  const operations = document.getElementById('operations');
  for (const [tag, ops] of [...byTag.entries()].sort()) {
    const section = el('section', { class: 'card', 'aria-label': tag }, el('h2', {}, tag));
    for (const { path, method, op } of ops) {
      const node = operation(path, method, op);
      section.append(node);
      const link = el('a', { href: `#${node.id}` }, `${method.toUpperCase()} ${path}`);
      link.addEventListener('click', () => {
        node.open = true;
      });
      toc.append(el('li', {}, link));
    }
    operations.append(section);
  }
  const schemas = document.getElementById('schemas');
  for (const [name, schema] of Object.entries(spec.components?.schemas || {}).sort()) {
    schemas.append(
      el('section', { id: `schema-${name}` }, el('h3', {}, name), schema.description ? el('p', {}, schema.description) : null, propertiesTable(schema)),
    );
  }
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

render().catch((error) => {
  document.getElementById('docs-intro').textContent = `Cannot show the reference: ${error.message}`;
});
