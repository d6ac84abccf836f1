"""The offline glossary translator and the loading of prompts/ data files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.errors import InvalidOption
from core.prompting import Glossary, GlossaryTranslator, PromptDataError, StyleBook, load_prompt_data
from core.prompting.glossary import Entry, GlossaryResult, WordClass, lemmas


@pytest.fixture(scope="module")
def glossary() -> Glossary:
    return load_prompt_data().glossary


def test_shipped_data_is_big_enough() -> None:
    data = load_prompt_data()
    assert len(data.glossary) >= 1500
    for name in ("水墨画", "赛博朋克", "油画", "动漫", "写实摄影", "儿童绘本", "像素风"):
        assert data.styles.find(name) is not None
    assert data.default_negative[:3] == ("低质量", "模糊", "畸形")
    assert data.styles.quality


@pytest.mark.parametrize(
    ("text", "zh", "unknown"),
    [
        ("a cat", "猫", ()),
        ("cats", "猫", ()),
        ("The Puppies", "小狗", ()),
        ("a red fox in the snow", "红色狐狸在雪中", ()),
        ("a cat reading a book on the moon", "猫在月球上看书", ()),
        ("sunflowers, butterflies", "向日葵，蝴蝶", ()),
        ("an old man fishing", "老人钓鱼", ()),
        ("dancing foxes", "跳舞的狐狸", ()),
        ("three wolves", "三只狼", ()),
        ("a cat named Whiskers", "猫名叫Whiskers", ("Whiskers",)),
        ("a zorblax and a zorblax", "zorblax zorblax", ("zorblax",)),
        ("a cat and 猫", "猫猫", ()),
        ("2 dogs", "2条狗", ()),
        ("🐱 🌙", "猫月亮", ()),
        ("😀 smile", "😀微笑", ("😀",)),
        ("chat sur la lune", "chat sur la lune", ("chat", "sur", "la", "lune")),
        ("猫が月で本を読む", "猫が月で本を読む", ("が", "で", "を", "む")),
        ("кошка", "кошка", ("кошка",)),
        ("the of a", "", ()),
        ("<>()[]", "", ()),
        ("", "", ()),
    ],
)
def test_glossary_translation(glossary: Glossary, text: str, zh: str, unknown: tuple[str, ...]) -> None:
    result = glossary.translate(text)
    assert (result.text_zh, result.unknown_words) == (zh, unknown)


async def test_glossary_translator_port(glossary: Glossary) -> None:
    translation = await GlossaryTranslator(glossary).translate("a blue whale and a zorblax", "en")
    assert translation.text_zh == "蓝色鲸鱼zorblax"
    assert translation.unknown_words == ("zorblax",)


# (english, Chinese terms the output must contain, English words allowed to remain)
REALISTIC: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("a red fox in the snow, oil painting", ("红色狐狸", "在雪中", "油画"), ()),
    ("two kids flying a kite on the beach at sunset", ("两个孩子", "在海滩上放风筝", "日落"), ()),
    ("cyberpunk city street at night with neon lights", ("赛博朋克", "城市街道", "夜晚", "霓虹灯"), ()),
    ("A cute cat reading books on the moon at night", ("可爱猫在月球上看书", "夜晚"), ()),
    ("three cats sleeping on a sofa", ("三只猫在沙发上睡觉",), ()),
    ("a girl with long hair standing in the rain", ("女孩带着长发", "在雨中站着"), ()),
    ("an old man fishing by the river, ink painting", ("老人", "在河", "钓鱼", "水墨画"), ()),
    ("a lighthouse on a cliff during a storm", ("灯塔在悬崖上", "暴风雨"), ()),
    ("a bowl of ramen, food photography", ("一碗拉面", "美食摄影"), ()),
    ("a white horse running across a golden field", ("白色马", "奔跑", "金色田野"), ()),
    ("portrait of a young woman, soft light", ("肖像", "年轻女人", "柔光"), ()),
    ("a tiny house in the forest, watercolor", ("房子在森林里", "水彩"), ()),
    ("snow-covered mountains under a starry sky", ("白雪覆盖山", "在星空下"), ()),
    ("a samurai standing under cherry blossoms", ("武士在樱花下站着",), ()),
    ("five yellow ducks swimming in a pond", ("五只黄色鸭子在池塘里游泳",), ()),
    ("a dragon flying over the mountains", ("龙", "在山上空", "飞"), ()),
    ("an astronaut riding a horse on mars", ("宇航员在火星上骑马",), ()),
    ("a cozy coffee shop on a rainy day", ("温馨咖啡店", "雨天"), ()),
    ("a robot watering flowers in the garden", ("机器人在花园里", "浇", "花"), ()),
    ("four children playing football in the park", ("四个孩子在公园里踢足球",), ()),
    ("a black cat sitting on a wooden fence under the full moon", ("黑色猫", "在木制栅栏上", "在满月下"), ()),
    ("a small boat on a calm lake at dawn", ("小船在平静湖上", "黎明"), ()),
    ("sunflowers in a vase, impressionist painting", ("向日葵在花瓶里", "印象派"), ()),
    ("a futuristic city with flying cars, concept art", ("未来感城市", "汽车", "概念艺术"), ()),
    ("a panda eating bamboo in the bamboo forest", ("熊猫在竹林里吃竹子",), ()),
    ("two swans on a misty lake", ("两只天鹅", "湖上"), ()),
    ("a little girl holding a red balloon", ("小女孩拿着红色气球",), ()),
    ("an ancient temple in the mountains, chinese painting", ("古代寺庙", "在山里", "国画"), ()),
    ("a wolf howling at the moon", ("狼对着月亮嚎叫",), ()),
    ("a steampunk airship above the clouds", ("蒸汽朋克飞艇", "在云上方"), ()),
    ("a bustling night market with red lanterns", ("热闹夜市", "红灯笼"), ()),
    ("a fluffy puppy sleeping in a basket", ("毛茸茸小狗在篮子里睡觉",), ()),
    ("a mermaid swimming under the sea", ("美人鱼", "海", "游泳"), ()),
    ("a knight fighting a giant dragon", ("骑士", "战斗", "巨大龙"), ()),
    ("a bright rainbow over a green valley", ("明亮彩虹", "绿色山谷"), ()),
    ("a pixel art castle at sunrise", ("像素风城堡", "日出"), ()),
    ("close-up of a bee on a purple flower, macro photography", ("特写", "蜜蜂在紫色花上", "微距摄影"), ()),
    ("a snowy village at christmas", ("村庄", "圣诞节"), ()),
    ("seven stars shining in the dark sky", ("七颗星星", "闪耀", "天空中"), ()),
    ("a boy and his dog walking along the beach", ("男孩和狗", "沿着海滩走路"), ()),
    ("The old fisherman sailed into the storm.", ("老渔夫", "航行", "暴风雨"), ()),
    ("She opened the door and saw a dragon.", ("打开门", "看见龙"), ()),
    ("Lily ran home at night, she was scared.", ("Lily", "跑回家", "夜晚", "害怕"), ("Lily",)),
    ("The children laughed happily in the garden.", ("孩子", "在花园里快乐地笑"), ()),
    ("He walked slowly through the dark forest.", ("慢慢地走", "穿过黑暗森林"), ()),
    ("The princess was sleeping in a tall tower.", ("公主在高塔里睡觉",), ()),
    ("They found a golden key under the old bridge.", ("在古老桥下找到金色钥匙",), ()),
    ("The little rabbit hid behind a big rock.", ("小兔子在大石头后面躲",), ()),
    ("A huge wave crashed against the ship.", ("巨大海浪", "撞", "船"), ()),
    ("The wizard raised his staff and the sky turned red.", ("巫师举起法杖", "天空", "红色"), ()),
    ("We climbed the mountain and watched the sunrise.", ("爬山", "看着日出"), ()),
    ("The birds were singing in the trees.", ("鸟在树上唱歌",), ()),
    ("The girl cried quietly by the window.", ("女孩在窗户旁边安静地哭泣",), ()),
    (
        "An old woman lived alone in a small cottage near the lake.",
        ("老奶奶", "小屋里", "在湖附近", "独自生活"),
        (),
    ),
    ("The knight rode his horse across the burning bridge.", ("骑士骑马", "穿过燃烧的桥"), ()),
    ("Three little pigs built their houses.", ("三只小猪", "建造房子"), ()),
    ("The boy fell into the river and his friends pulled him out.", ("男孩", "掉进河", "朋友", "拉"), ()),
    ("Snow fell softly on the quiet village.", ("雪", "轻轻地落", "安静村庄"), ()),
    ("The king was angrier than ever.", ("国王更生气",), ()),
    ("She wore a beautiful blue dress to the ball.", ("穿着美丽蓝色连衣裙", "舞会"), ()),
    ("The dog barked loudly at the stranger.", ("狗对着陌生人大声地叫",), ()),
    ("The tallest tree in the forest was struck by lightning.", ("最高大树", "森林", "闪电"), ()),
    ("The cat jumped onto the table and knocked over a cup.", ("猫跳到桌子上", "打翻杯子"), ()),
    ("Two brothers travelled to a distant land.", ("两个兄弟", "旅行", "远方"), ()),
    ("The children had eaten all the cookies.", ("孩子", "吃", "饼干"), ()),
    ("The sun was setting behind the hills.", ("太阳在山丘后面", "落"), ()),
    ("A bright light flashed across the sky.", ("明亮光", "闪", "天空"), ()),
    ("She has been waiting for hours at the station.", ("在车站等待", "小时"), ()),
]


@pytest.mark.parametrize(("text", "terms", "kept"), REALISTIC, ids=[row[0][:40] for row in REALISTIC])
def test_realistic_prompts_and_passages(
    glossary: Glossary, text: str, terms: tuple[str, ...], kept: tuple[str, ...]
) -> None:
    zh = glossary.translate(text).text_zh
    assert [term for term in terms if term not in zh] == [], zh
    assert set(re.findall(r"[A-Za-z]+", zh)) == set(kept), zh


@pytest.mark.parametrize(
    ("text", "zh"),
    [
        ("two kids flying a kite on the beach at sunset", "日落时分，两个孩子在海滩上放风筝"),
        ("Lily ran home at night, she was scared.", "夜晚，Lily跑回家，害怕"),
        ("three cats, a bunch of roses, two trees, five mountains", "三只猫，一束玫瑰，两棵树，五座山"),
        ("two rivers and three dogs", "两条河流和三条狗"),
        ("a fox, bigger foxes, the biggest fox", "狐狸，更大狐狸，最大狐狸"),
        ("she smiled happily", "快乐地微笑"),
        ("a sleeping cat and flying cars", "睡觉的猫和飞行汽车"),
        ("the cat's hat", "猫的帽子"),
        ("a close-up of a snow-covered pine", "特写白雪覆盖松树"),
        ("the wolf stared at the girl", "狼对着女孩凝视"),
        ("she was dressed in red", "穿着红色"),
        ("in the morning the children went to school", "早晨，孩子去学校"),
        ("the birds in the trees", "鸟在树上"),
        ("he looked at it", "看着"),
        ("on", ""),
    ],
)
def test_word_order_counting_and_forms(glossary: Glossary, text: str, zh: str) -> None:
    assert glossary.translate(text).text_zh == zh


@pytest.mark.parametrize(
    ("word", "base"),
    [("cats", "cat"), ("puppies", "puppy"), ("wolves", "wolf"), ("foxes", "fox"), ("running", "run"),
     ("dancing", "dance"), ("painted", "paint"), ("cat's", "cat"), ("ran", "run"), ("flew", "fly"),
     ("saw", "see"), ("eaten", "eat"), ("children", "child"), ("stopped", "stop"), ("cried", "cry"),
     ("happier", "happy"), ("biggest", "big"), ("quietly", "quiet"), ("happily", "happy"),
     ("gently", "gentle"), ("knives", "knife"), ("Mice", "mouse")],
)  # fmt: skip
def test_lemmas(word: str, base: str) -> None:
    assert base in lemmas(word)


def test_forms_only_fit_their_word_class(glossary: Glossary) -> None:
    assert glossary.lookup("flower") == "花"  # not "flow" + -er
    assert glossary.lookup("quietly") == "安静地" and glossary.lookup("angrier") == "更生气"
    assert glossary.lookup("fell") == "落" and glossary.lookup("in the fall") is None
    assert glossary.translate("fall leaves").text_zh == "秋天树叶"
    assert glossary.lookup("the") == ""
    assert glossary.lookup("zorblax") is None and glossary.lookup(" ") is None


def test_a_word_may_have_one_entry_per_class(tmp_path: Path) -> None:
    path = tmp_path / "glossary.tsv"
    path.write_text(
        "# --- stop words ---\nthe\t-\n# --- locative prepositions ---\nin\t在…里\n"
        "# --- times ---\nfall\t秋天\n# --- actions ---\nfall\t落\n# --- animals ---\ncat\t猫\n",
        encoding="utf-8",
    )
    glossary = Glossary.from_file(path)
    assert len(glossary) == 5
    assert glossary.translate("the cat fell in the fall").text_zh == "秋天，猫落"
    assert glossary.translate("in the cat").text_zh == "在猫里"
    assert glossary.translate("two cats") == GlossaryResult("two猫", ("two",))


def test_mapping_glossary_has_no_classes() -> None:
    glossary = Glossary({"cat": "猫", "the": "-"})
    assert glossary.translate("the cats").text_zh == "猫"
    assert Glossary([Entry("cat", "猫", WordClass.ANIMATE, "只")]).lookup("cats") == "猫"


def test_passage_of_two_hundred_words_is_translated(glossary: Glossary) -> None:
    passage = " ".join(text for text, _, _ in REALISTIC[40:]).split()
    result = glossary.translate(" ".join((passage * 2)[:200]))
    assert result.unknown_words == ("Lily",) and len(result.text_zh) > 200


def test_huge_input_is_handled(glossary: Glossary) -> None:
    result = glossary.translate("a cat on the moon " * 2000)
    assert result.text_zh.startswith("猫在月球上猫") and result.unknown_words == ()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cat\n", "line 1 must be 'english<TAB>chinese'"),
        ("cat\t猫\tx\n", "line 1 must be"),
        ("# c\ncat\t猫\nCat\t猫\n", "line 3 repeats the entry 'Cat'"),
        ("# only comments\n", "has no entries"),
        ("# --- verbs ---\nrun\t跑\n", "line 1 names an unknown section 'verbs'"),
        ("with its\t-\n", "line 1: 'with its' is just 'with' once determiners"),
        ("# --- actions ---\nrun\t跑\nrun\t奔跑\n", "line 3 repeats the entry 'run'"),
    ],
)
def test_malformed_glossary(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "glossary.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptDataError, match=message):
        Glossary.from_file(path)


def test_glossary_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "glossary.tsv"
    path.write_bytes(b"cat\t\xff\xfe\n")
    with pytest.raises(PromptDataError, match="not valid UTF-8"):
        Glossary.from_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("quality = [\n", "not valid TOML"),
        ("quality = []\n", "needs a \\[styles.<name>\\] table"),
        ('[styles."a"]\ntags = []\n', "at least one tag"),
        ('[styles."a"]\ntags = ["x"]\ncolour = 1\n', "unknown keys"),
        ('[styles."a"]\ntags = [1]\n', "list of non-empty strings"),
        ('[styles."a"]\ntags = ["x"]\naliases = ["b"]\n[styles."b"]\ntags = ["y"]\n', "used by both"),
    ],
)
def test_malformed_styles(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "styles.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptDataError, match=message):
        StyleBook.from_file(path)


@pytest.mark.parametrize(
    ("name", "style"),
    [("ink", "水墨画"), ("INK-WASH", "水墨画"), ("水墨", "水墨画"), ("賽博朋克", "赛博朋克"),
     ("Cyber Punk", "赛博朋克"), ("picture book", "儿童绘本"), ("pixel_art", "像素风"), ("ｏｉｌ", "油画"),
     ("photo", "写实摄影"), ("anime", "动漫")],
)  # fmt: skip
def test_style_names_and_aliases(name: str, style: str) -> None:
    assert load_prompt_data().styles.get(name).name == style


def test_unknown_style_lists_the_choices() -> None:
    with pytest.raises(
        InvalidOption, match=r"^--style must be one of: 水墨画 \(ink\), 赛博朋克 \(cyberpunk\)"
    ):
        load_prompt_data().styles.get("vaporwave")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PromptDataError, match=r"negative\.txt is missing"):
        load_prompt_data(tmp_path)
